"""`medimgen weights download/list` against a loopback HTTP server, and the plan-time notice.

No real pretrained weights are used anywhere here: the AlexNet file the server hands out is a
RANDOMLY INITIALISED torchvision AlexNet state dict THAT THIS TEST MAKES (torchvision.models.alexnet(),
seed 0), saved under the torchvision file name. Its sha256 is not the one that name's hash prefix
promises, so the tests that must pass the checksum register the test-made file's sha256 through
`--checksums` (the mechanism a mirror serving other builds would use); the test without it shows the
torch.hub hash-prefix check refusing the file.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from medimgen.cli import main
from tests.conftest import FLAT_2D

ALEX_URL_PATH = "/models/alexnet-owt-7be5be79.pth"  # the path of torchvision's AlexNet URL


@pytest.fixture(scope="module")
def test_made_alexnet() -> bytes:
    """A random-weight AlexNet state dict made here (not the ImageNet weights), as bytes."""
    import torchvision

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), buf)
    data = buf.getvalue()
    assert not hashlib.sha256(data).hexdigest().startswith("7be5be79")  # so the hash-prefix check must refuse it
    return data


class _Server:
    """Loopback HTTP server: serves ``files`` {url path: bytes} with Range support, logs every request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.heads: dict[str, dict] = {}  # url path -> headers its HEAD answer carries (a redirect, as the hub's)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                outer.requests.append({"path": self.path, "method": "HEAD"})
                if self.path not in outer.heads:
                    self.send_error(405)
                    return
                self.send_response(302)
                for k, v in outer.heads[self.path].items():
                    self.send_header(k, v)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                data = outer.files.get(self.path)
                rng = self.headers.get("Range")
                outer.requests.append({"path": self.path, "range": rng})
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                outer.requests[-1]["status"], outer.requests[-1]["sent"] = (206 if start else 200), len(body)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("MEDIMGEN_WEIGHTS_MIRROR", raising=False)
    return home


def _checksums(tmp_path: Path, data: bytes) -> Path:
    f = tmp_path / "SHA256SUMS"
    f.write_text(f"{hashlib.sha256(data).hexdigest()}  alexnet-owt-7be5be79.pth\n")
    return f


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_download_alex_then_a_perceptual_training_step(torch_home, tmp_path, server, test_made_alexnet):
    from medimgen.models.perceptual import build_perceptual_loss, torchvision_weights_file

    server.files[ALEX_URL_PATH] = test_made_alexnet
    r = CliRunner().invoke(main, ["weights", "download", "alex", "--mirror", server.url,
                                  "--checksums", str(_checksums(tmp_path, test_made_alexnet))])
    assert r.exit_code == 0, r.output
    expected, _ = torchvision_weights_file("alex")  # where the perceptual loss looks
    assert expected == torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert expected.read_bytes() == test_made_alexnet
    assert f"downloaded  {expected}" in r.output and "(checked: sha256)" in r.output
    assert not list(expected.parent.glob("*.part"))
    assert [q["path"] for q in server.requests] == [ALEX_URL_PATH]

    # a second run finds it and fetches nothing
    again = CliRunner().invoke(main, ["weights", "download", "alex", "--mirror", server.url])
    assert again.exit_code == 0 and f"present     {expected}" in again.output and len(server.requests) == 1

    # one training step of a (tiny) generator through the perceptual loss built from the downloaded file
    loss_fn = build_perceptual_loss("alex", 2, False, 0.2, (64, 64))
    conv = next(m for m in loss_fn.modules() if isinstance(m, torch.nn.Conv2d))
    served = torch.load(io.BytesIO(test_made_alexnet), weights_only=True)
    torch.testing.assert_close(conv.weight, served["features.0.weight"])  # loaded from the downloaded file
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    before = net.weight.detach().clone()
    loss = loss_fn(net(x), x).mean()
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.parameters())  # the perceptual network stays frozen
    opt.step()
    assert not torch.equal(before, net.weight)


def test_resume_continues_a_partial_download_with_a_range_request(torch_home, tmp_path, server, test_made_alexnet,
                                                                  monkeypatch):
    from medimgen.models.weights import torchvision_weights_file

    server.files[ALEX_URL_PATH] = test_made_alexnet
    dest, _ = torchvision_weights_file("alex")
    dest.parent.mkdir(parents=True)
    half = len(test_made_alexnet) // 2
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(test_made_alexnet[:half])  # an interrupted earlier download
    monkeypatch.setenv("MEDIMGEN_WEIGHTS_MIRROR", server.url)  # the environment variable works like --mirror
    r = CliRunner().invoke(main, ["weights", "download", "alex", "--checksums",
                                  str(_checksums(tmp_path, test_made_alexnet))])
    assert r.exit_code == 0, r.output
    assert server.requests == [{"path": ALEX_URL_PATH, "range": f"bytes={half}-", "status": 206,
                                "sent": len(test_made_alexnet) - half}]
    assert dest.read_bytes() == test_made_alexnet and not part.exists()


def test_checksum_mismatch_is_one_line_and_leaves_no_file(torch_home, server, test_made_alexnet):
    from medimgen.models.weights import torchvision_weights_file

    server.files[ALEX_URL_PATH] = test_made_alexnet  # not the file whose sha256 starts with 7be5be79
    r = CliRunner().invoke(main, ["weights", "download", "alex", "--mirror", server.url])
    line = _one_line_error(r)
    assert "checksum mismatch" in line and "7be5be79" in line and "removed" in line
    dest, _ = torchvision_weights_file("alex")
    assert not dest.exists() and not list(dest.parent.glob("*.part"))


def test_unreachable_mirror_is_one_line(torch_home, server):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(main, ["weights", "download", "alex", "--mirror", f"http://127.0.0.1:{port}"])
    line = _one_line_error(r)
    assert "cannot download alexnet-owt-7be5be79.pth" in line and "MEDIMGEN_WEIGHTS_MIRROR" in line
    # a mirror that answers but lacks the file: one line too
    line = _one_line_error(CliRunner().invoke(main, ["weights", "download", "vgg", "--mirror", server.url]))
    assert "vgg16-397923af.pth" in line and "404" in line
    assert not list((torch_home / "hub" / "checkpoints").glob("*"))


def test_weights_list(torch_home, tmp_path, server, test_made_alexnet):
    r = CliRunner().invoke(main, ["weights", "list"])
    assert r.exit_code == 0, r.output
    hub = torch_home / "hub"
    assert f"torch hub cache: {hub}" in r.output
    for name in ("alex", "vgg", "squeeze", "radimagenet", "medicalnet", "inception"):
        assert f"missing  -> medimgen weights download {name}" in r.output
    assert f"--  {hub / 'checkpoints' / 'alexnet-owt-7be5be79.pth'}" in r.output
    assert f"--  {hub / 'checkpoints' / 'inception_v3_google-0cc3c7bd.pth'}" in r.output
    assert f"--  {hub / 'Project-MONAI_perceptual-models_main'}  (torch.hub repository)" in r.output
    assert f"--  {hub / 'monai_checkpoints' / 'RadImageNet-ResNet50_notop.pth'}" in r.output
    server.files[ALEX_URL_PATH] = test_made_alexnet
    assert CliRunner().invoke(main, ["weights", "download", "alex", "--mirror", server.url, "--checksums",
                                     str(_checksums(tmp_path, test_made_alexnet))]).exit_code == 0
    after = CliRunner().invoke(main, ["weights", "list"]).output
    assert "alex         present" in after and f"ok  {hub / 'checkpoints' / 'alexnet-owt-7be5be79.pth'}" in after
    assert "missing  -> medimgen weights download vgg" in after


def test_plan_says_when_the_planned_weights_are_absent(nnunet_env, torch_home, test_made_alexnet):
    """Dataset 202 (64x64 CT) plans AlexNet: a one-line notice without its weights, `none` only with --offline."""
    cfg_path = nnunet_env["nnUNet_preprocessed"] / "Dataset202_Flat" / "medimgen_config.yaml"

    def plan(*extra):
        r = CliRunner().invoke(main, ["plan", "-d", str(FLAT_2D), "--force", *extra])
        assert r.exit_code == 0, r.output
        notes = [ln for ln in r.output.splitlines() if ln.startswith("note:")]
        return notes, yaml.safe_load(cfg_path.read_text())["2d"]["losses"]["perceptual_network"]

    notes, net = plan()
    assert net == "alex" and len(notes) == 1  # still planned: after the download, training works
    assert "'alex'" in notes[0] and "`medimgen weights download alex`" in notes[0] and str(torch_home) in notes[0]
    notes, net = plan("--offline")
    assert net == "none" and len(notes) == 1
    assert "--offline" in notes[0] and "`medimgen weights download alex`" in notes[0]
    # with the weights in place: alex either way, no notice
    dest = torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(test_made_alexnet)
    assert plan("--offline") == ([], "alex")
    assert plan() == ([], "alex")  # leaves the session's config as the other tests plan it


def test_torchvision_urls_are_torchvisions_own():
    """The weight URLs written out in medimgen.models.weights (so that a look-up imports no torchvision) are the ones
    torchvision's weight enums name."""
    import torchvision.models as tvm

    from medimgen.models.weights import TORCHVISION

    for network, (builder, enum_name, url) in TORCHVISION.items():
        assert getattr(tvm, enum_name).IMAGENET1K_V1.url == url, network
        assert callable(getattr(tvm, builder)), network


MAISI_URL_PATH = "/nvidia/NV-Generate-CT/resolve/main/models/autoencoder_v1.pt"


@pytest.fixture(scope="module")
def test_made_maisi() -> bytes:
    """A state dict of MAISI's published VAE architecture with RANDOM weights made here (not NVIDIA's file)."""
    from medimgen.models.foundation import build_foundation_autoencoder

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(build_foundation_autoencoder("maisi").state_dict(), buf)
    return buf.getvalue()


def test_maisi_vae_download_checks_the_sha256_the_server_states(torch_home, server, test_made_maisi):
    """The hub states an LFS file's sha256 in X-Linked-ETag on its (redirecting) resolve answer: the download is
    checked against it; a mismatch is one line and leaves no file."""
    server.files[MAISI_URL_PATH] = test_made_maisi
    server.heads[MAISI_URL_PATH] = {"X-Linked-ETag": '"' + "0" * 64 + '"'}
    line = _one_line_error(CliRunner().invoke(main, ["weights", "download", "maisi-vae", "--mirror", server.url]))
    assert "checksum mismatch" in line
    dest = torch_home / "hub" / "checkpoints" / "nv-generate-ct_autoencoder_v1.pt"
    assert not dest.exists() and not list(dest.parent.glob("*.part"))
    server.heads[MAISI_URL_PATH] = {"X-Linked-ETag": '"' + hashlib.sha256(test_made_maisi).hexdigest() + '"'}
    r = CliRunner().invoke(main, ["weights", "download", "maisi-vae", "--mirror", server.url])
    assert r.exit_code == 0, r.output
    assert dest.read_bytes() == test_made_maisi and f"downloaded  {dest} (checked: sha256)" in r.output


def test_maisi_vae_without_a_stated_sha256_is_checked_by_format(torch_home, server, test_made_maisi,
                                                                  test_made_alexnet):
    """A mirror that states no sha256: the file must be a state dict that loads into the published network."""
    server.files[MAISI_URL_PATH] = test_made_alexnet  # a state dict, but not of the VAE
    line = _one_line_error(CliRunner().invoke(main, ["weights", "download", "maisi-vae", "--mirror", server.url]))
    assert "does not fit the published network" in line
    server.files[MAISI_URL_PATH] = test_made_maisi
    r = CliRunner().invoke(main, ["weights", "download", "maisi-vae", "--mirror", server.url])
    assert r.exit_code == 0 and "checked: format: a state dict of the published network" in r.output, r.output
