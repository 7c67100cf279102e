"""Named assets (the authors' phi): `mpbench data prepare/verify`, and stage files given by name or path."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
import yaml

from mpbench import assets
from mpbench.assets import resolve_stage_file
from mpbench.config import load_suite
from mpbench.errors import DataMissingError, UsageError
from mpbench.plan import artifact_file_ref
from regularizers.metaperturb import PerturbFunction

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "metaperturb_official_tin_resnet20_750.pth"
needs_reference = pytest.mark.skipif(not REFERENCE.is_file(), reason="the authors' phi is not in ../shared/reference")
NAME = "metaperturb_official"
ASSET = assets.ASSETS.get(NAME)


def stored(root: Path) -> Path:
    return root / "assets" / NAME / "perturb_750.pth"


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


class Payload:
    """Unpickling this runs os.mkdir: what a hostile "phi" could do to a loader without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture
def own_phi(tmp_path) -> Path:
    """A valid MetaPerturb phi that is not the authors' release."""
    path = tmp_path / "own_phi.pt"
    PerturbFunction().save_phi(path)
    return path


def test_registry_entry_points_at_the_release():
    assert ASSET.filename == "perturb_750.pth"
    assert ASSET.sha256 == "63f47f80b32a00840b3af0b84ae778543de27c7eb9450d76261bfacad182211f"
    assert ASSET.url == ("https://raw.githubusercontent.com/JWoong148/MetaPerturb/master/checkpoints/src/"
                         "tiny_imagenet_resnet20_final/perturb_750.pth")


@needs_reference
def test_prepare_from_the_release_then_verify(cli, tmp_path):
    code, out, err = cli("data", "prepare", NAME, "--from", REFERENCE, "--data", tmp_path)
    assert code == 0, err
    assert stored(tmp_path).read_bytes() == REFERENCE.read_bytes()
    code, out, err = cli("data", "verify", NAME, "--data", tmp_path)
    assert code == 0 and "sha256 ok" in out, err
    # a damaged copy is reported, with the fix
    data = bytearray(stored(tmp_path).read_bytes())
    data[-1] ^= 0xFF
    stored(tmp_path).write_bytes(bytes(data))
    code, _, err = cli("data", "verify", NAME, "--data", tmp_path)
    line = one_line(err)
    assert code == 2 and "corrupt" in line and f"mpbench data prepare {NAME} --from FILE" in line


def test_verify_when_not_prepared(cli, tmp_path):
    code, _, err = cli("data", "verify", NAME, "--data", tmp_path)
    line = one_line(err)
    assert code == 2 and str(stored(tmp_path)) in line and f"mpbench data prepare {NAME} --from FILE" in line


def test_a_phi_that_is_not_the_release_is_refused(cli, tmp_path, own_phi):
    code, _, err = cli("data", "prepare", NAME, "--from", own_phi, "--data", tmp_path / "data")
    line = one_line(err)
    assert code == 2 and "sha256" in line and str(own_phi) in line and ASSET.url in line
    assert not stored(tmp_path / "data").exists()


@pytest.mark.parametrize("content", ["payload", "not_phi"])
def test_a_pickle_payload_or_other_object_is_refused_without_running_it(cli, tmp_path, content):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "perturb_750.pth"
    torch.save({"fc.weight": Payload(marker)} if content == "payload" else [1, 2, 3], path)
    code, _, err = cli("data", "prepare", NAME, "--from", path, "--data", tmp_path / "data")
    line = one_line(err)
    assert code == 2 and str(path) in line
    assert ("pickled Python objects" if content == "payload" else "not a MetaPerturb phi") in line
    assert not marker.exists() and not stored(tmp_path / "data").exists()


def test_prepare_from_a_missing_file(cli, tmp_path):
    code, _, err = cli("data", "prepare", NAME, "--from", tmp_path / "nope.pth", "--data", tmp_path)
    assert code == 2 and "nope.pth" in one_line(err)


@pytest.mark.parametrize("var", assets.OFFLINE_VARS)
def test_offline_without_from_says_what_to_fetch(cli, tmp_path, monkeypatch, var):
    for v in assets.OFFLINE_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(assets.urllib.request, "urlopen", lambda *a, **k: pytest.fail("tried the network"))
    code, _, err = cli("data", "prepare", NAME, "--data", tmp_path)
    line = one_line(err)
    assert code == 2 and var in line and ASSET.url in line and f"mpbench data prepare {NAME} --from" in line
    assert not stored(tmp_path).exists()


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("served", ["release", "other", "unreachable"])
def test_download_is_checked_before_it_is_stored(tmp_path, monkeypatch, own_phi, served):
    """Online (no offline variable set): the fetched bytes are checked like a --from file (network faked)."""
    if served == "release" and not REFERENCE.is_file():
        pytest.skip("the authors' phi is not in ../shared/reference")
    for v in assets.OFFLINE_VARS:
        monkeypatch.delenv(v, raising=False)
    urls = []

    def urlopen(url, timeout):
        urls.append((url, timeout))
        if served == "unreachable":
            raise assets.urllib.error.URLError("Name or service not known")
        return _Response((REFERENCE if served == "release" else own_phi).read_bytes())

    monkeypatch.setattr(assets.urllib.request, "urlopen", urlopen)
    if served == "release":
        assert "stored at" in assets.prepare(NAME, tmp_path)
        assert stored(tmp_path).read_bytes() == REFERENCE.read_bytes()
        assert "already prepared" in assets.prepare(NAME, tmp_path) and len(urls) == 1
    else:
        with pytest.raises(DataMissingError) as e:
            assets.prepare(NAME, tmp_path)
        msg = str(e.value)
        assert "\n" not in msg and ASSET.url in msg and f"mpbench data prepare {NAME} --from" in msg
        assert not stored(tmp_path).exists()
    assert urls[0][0] == ASSET.url and urls[0][1] <= 60


def test_from_is_rejected_for_datasets(cli, tmp_path, own_phi):
    code, _, err = cli("data", "prepare", "digits", "--from", own_phi)
    assert code == 2 and "not supported for datasets" in one_line(err)
    code, _, err = cli("data", "prepare", "imagenett")
    assert code == 2 and "unknown dataset or asset" in one_line(err)


# ---- stage files: asset names and paths ----------------------------------------------------------------------------
@needs_reference
def test_resolve_an_asset_name(cli, tmp_path):
    assert cli("data", "prepare", NAME, "--from", REFERENCE, "--data", tmp_path)[0] == 0
    assert resolve_stage_file(NAME, None, tmp_path) == stored(tmp_path)
    ref = artifact_file_ref(NAME, data_root=tmp_path)
    assert ref == f"file:{stored(tmp_path).resolve()}#{ASSET.sha256[:16]}"


def test_resolve_an_asset_that_is_not_prepared(tmp_path):
    with pytest.raises(DataMissingError) as e:
        resolve_stage_file(NAME, None, tmp_path, key="stages.metatrain.file")
    msg = str(e.value)
    assert "stages.metatrain.file" in msg and f"mpbench data prepare {NAME} --from FILE" in msg and "\n" not in msg


def test_resolve_paths(tmp_path, monkeypatch, own_phi):
    suite_dir, cwd = tmp_path / "suites", tmp_path / "cwd"
    suite_dir.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (suite_dir / "phi.pt").write_bytes(own_phi.read_bytes())
    (cwd / "only_here.pt").write_bytes(own_phi.read_bytes())
    (cwd / "phi.pt").write_bytes(b"the working dir's file")
    assert resolve_stage_file(str(own_phi), suite_dir, None) == own_phi.resolve()           # absolute
    assert resolve_stage_file("phi.pt", suite_dir, None) == suite_dir / "phi.pt"          # suite dir first
    assert resolve_stage_file("only_here.pt", suite_dir, None) == cwd / "only_here.pt"    # then the working dir
    assert resolve_stage_file("phi.pt", None, None) == cwd / "phi.pt"
    with pytest.raises(UsageError) as e:
        resolve_stage_file("missing.pt", suite_dir, None, key="stages.pretrain.file")
    msg = str(e.value)
    assert "stages.pretrain.file" in msg and str(suite_dir / "missing.pt") in msg and NAME in msg and "\n" not in msg


def test_no_project_root_fallback(tmp_path, monkeypatch):
    """A path that exists only relative to the checkout is not found from elsewhere."""
    monkeypatch.chdir(tmp_path)
    assert (Path(__file__).resolve().parents[1] / "suites" / "quickstart.yaml").is_file()
    with pytest.raises(UsageError, match="not found"):
        artifact_file_ref("suites/quickstart.yaml")


def test_suite_records_its_file_and_stage_files_resolve_next_to_it(tmp_path, monkeypatch, own_phi):
    suite_dir = tmp_path / "mysuites"
    suite_dir.mkdir()
    (suite_dir / "phi.pt").write_bytes(own_phi.read_bytes())
    path = suite_dir / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "stages": {"metatrain": {"file": "phi.pt"}}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_suite(str(path))
    assert cfg.source == str(path.resolve())
    ref = artifact_file_ref(cfg.stages.metatrain.file, suite_dir=Path(cfg.source).parent)
    assert ref.startswith(f"file:{(suite_dir / 'phi.pt').resolve()}#") and len(ref.rsplit("#", 1)[1]) == 16


def test_the_official_suite_names_the_asset():
    cfg = load_suite("metaperturb-official")
    assert cfg.stages.metatrain.file == NAME


def test_metaperturb_phi_hparam_takes_an_asset_name(tmp_path, monkeypatch):
    from mpbench.regularization import RunContext
    from regularizers.metaperturb import MetaPerturb

    monkeypatch.setenv("MPBENCH_DATA", str(tmp_path))
    ctx = RunContext(spec={}, model_name="conv4", num_classes=10, in_chans=3, image_size=32, total_steps=10,
                     num_train=100)
    with pytest.raises(DataMissingError, match=f"reg.metaperturb.phi={NAME}"):
        MetaPerturb(ctx, phi=NAME).phi_path()
    if REFERENCE.is_file():
        assets.prepare(NAME, None, REFERENCE)
        assert MetaPerturb(ctx, phi=NAME).phi_path() == stored(tmp_path)
