"""Suite progress: a rich display (suite bar with done/running/failed/queued and ETA, one bar per active run)
on a terminal, plain log lines otherwise."""
from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class SuiteProgress:
    def __init__(self, total: int, title: str, console: Console | None = None, live: bool | None = None):
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self.total = total
        self.counts = {"done": 0, "running": 0, "failed": 0, "skipped": 0}
        self.title = title
        self.t0 = time.time()
        self.tasks: dict[str, Any] = {}
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                                     transient=False)
            self.suite_task = self.progress.add_task(self._label(), total=total)

    def _label(self) -> str:
        c = self.counts
        queued = self.total - c["done"] - c["failed"] - c["running"] - c["skipped"]
        return (f"[bold]{self.title}[/] done {c['done'] + c['skipped']} · running {c['running']} · "
                f"failed {c['failed']} · queued {max(queued, 0)}")

    def __enter__(self) -> "SuiteProgress":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress:
            self.progress.stop()

    def _refresh(self) -> None:
        if self.progress:
            finished = self.counts["done"] + self.counts["failed"] + self.counts["skipped"]
            self.progress.update(self.suite_task, description=self._label(), completed=finished)

    def _print(self, line: str) -> None:
        """One plain line; a display that cannot be written (a closed terminal) never stops a run or its stop."""
        try:
            (self.progress.console if self.progress else self.console).print(line, highlight=False, markup=False,
                                                                             soft_wrap=True)
        except OSError:
            pass

    def started(self, run_id: str, total_steps: int | None, resume_from: int | str | None = None) -> None:
        """``resume_from``: the step its checkpoint resumes from ("?" when unknown), None for a fresh start."""
        self.counts["running"] += 1
        if resume_from is not None:
            self._print(f"resuming {run_id} from " + (f"step {resume_from}" if resume_from != "?" else
                                                       "its checkpoint"))
        if self.progress:
            self.tasks[run_id] = self.progress.add_task(f"  {run_id}", total=total_steps or 1,
                                                        completed=resume_from if isinstance(resume_from, int) else 0)
        elif resume_from is None:
            self._print(f"start  {run_id}")
        self._refresh()

    def note(self, line: str) -> None:
        """A line about the suite as a whole (e.g. that it is stopping)."""
        self._print(line)

    def step(self, run_id: str, step: int, total: int, loss: float | None = None) -> None:
        if self.progress and run_id in self.tasks:
            desc = f"  {run_id}" + (f" loss {loss:.3f}" if loss is not None else "")
            self.progress.update(self.tasks[run_id], completed=step, total=total, description=desc)

    def finished(self, run_id: str, outcome: str, detail: str = "") -> None:
        if run_id in self.tasks or not self.progress:
            self.counts["running"] = max(0, self.counts["running"] - 1)
        if self.progress and run_id in self.tasks:
            self.progress.remove_task(self.tasks.pop(run_id))
        key = outcome if outcome in self.counts else "failed" if outcome == "failed" else "skipped"
        if outcome in ("interrupted", "busy"):
            key = None
        if key:
            self.counts[key] += 1
        mark = {"done": "done ", "failed": "FAIL ", "skipped": "skip ", "interrupted": "stop ", "busy": "busy "}
        line = f"{mark.get(outcome, outcome)}  {run_id}" + (f"  {detail}" if detail else "")
        if outcome != "skipped" or not self.progress:
            self._print(line)
        self._refresh()

    def summary(self) -> str:
        c = self.counts
        return (f"{self.title}: {c['done']} trained, {c['skipped']} already done, {c['failed']} failed "
                f"in {time.time() - self.t0:.0f}s")
