"""Test fixtures: an isolated Hugging Face cache and a real read-only Hub server (olah) on 127.0.0.1.

`HF_ENDPOINT` and `HF_HOME` are read once, when `huggingface_hub.constants` is first imported, so they are
set here at conftest import time, before any test module imports a Hugging Face library. The server itself
starts lazily, the first time a test asks for the `hub` fixture, and is killed by its PID at the end.

Fixture repos are ordinary git repos under `<root>/mirrors/models/<org>/<name>`; olah serves them in
offline mirror mode (it never contacts the real Hub; its upstream points at a dead loopback port).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_ROOT = Path(tempfile.mkdtemp(prefix="wf-tests-"))
_PORT = _free_port()
ENDPOINT = f"http://127.0.0.1:{_PORT}"
os.environ["HF_ENDPOINT"] = ENDPOINT
os.environ["HF_HOME"] = str(_ROOT / "hf_home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_UPDATE_CHECK"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    os.environ.pop(_var, None)  # never use a developer's token or cache in tests

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # `pytest -n N` (the default, see pyproject.toml): N workers share the cores, so each gets its share of
    # intra-op threads instead of all of them (set before torch is first imported in this worker)
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

_READY_REPO = "wf-test/ready"


class LocalHub:
    """A running olah server plus helpers that commit folders as fixture repos."""

    def __init__(self, root: Path, port: int):
        self.root = root
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.mirrors = root / "mirrors"
        self.process: subprocess.Popen | None = None
        self.log_path = root / "olah.log"

    # ---------------------------------------------------------------------------------------- repos
    def repo_path(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def add_repo(self, repo_id: str, folder: str | Path | None = None, files: dict | None = None) -> str:
        """Commit `folder`'s files (and/or `files`: name → bytes/str) to `repo_id`; return the commit sha.

        Calling it again for the same repo adds a new commit on `main` (files are replaced).
        """
        path = self.repo_path(repo_id)
        if not (path / ".git").is_dir():
            path.mkdir(parents=True, exist_ok=True)
            _git(path, "init", "-q", "-b", "main")
        for item in path.iterdir():
            if item.name != ".git":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        if folder is not None:
            shutil.copytree(folder, path, dirs_exist_ok=True)
        for name, content in (files or {}).items():
            target = path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        _git(path, "add", "-A")
        _git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "up")
        return _git(path, "rev-parse", "HEAD").strip()

    # --------------------------------------------------------------------------------------- server
    def start(self, timeout: float = 60.0) -> None:
        self.add_repo(_READY_REPO, files={"README.md": "ready\n"})
        config = self.root / "configs.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f'repos-path = "{self.root / "olah-cache"}"\n'
            'hf-scheme = "http"\n'
            'hf-netloc = "127.0.0.1:9"\n'
            'hf-lfs-netloc = "127.0.0.1:9"\n'
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            "\n[accessibility]\noffline = true\n"
        )
        olah = shutil.which("olah-cli") or str(Path(sys.executable).parent / "olah-cli")
        if not Path(olah).exists():
            pytest.fail("olah-cli not found: install the dev extra (pip install -e '.[dev]')")
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [olah, "-c", str(config)], cwd=self.root, stdout=log, stderr=subprocess.STDOUT
        )
        url = f"{self.endpoint}/api/models/{_READY_REPO}/revision/main"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"olah did not answer {url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # our own child, by PID
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no olah log)"


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="session")
def hub():
    """The running local Hub (olah on 127.0.0.1); `HF_ENDPOINT` already points at it."""
    server = LocalHub(_ROOT, _PORT)
    server.start()
    yield server
    server.stop()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_ROOT, ignore_errors=True)


# ----------------------------------------------------------------------------------- tiny teachers
LABELS = ["cat", "dog", "emu"]


def tiny_timm(seed: int, labels=LABELS, channels=(8, 16, 16, 16)):
    """A timm resnet10t with 8-16 channels and one input channel (~17k parameters)."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(
        "resnet10t", in_chans=1, num_classes=len(labels), channels=channels, stem_width=8
    )
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": list(labels)}
    return model.eval()


def save_timm(model, folder: Path, labels=LABELS, license: str | None = "apache-2.0") -> Path:
    """A timm-format repo folder (config.json + model.safetensors + README.md with a license)."""
    import timm

    timm.models.save_for_hf(
        model, folder, model_config={"label_names": list(labels)}, safe_serialization=True
    )
    if license:
        (folder / "README.md").write_text(f"---\nlicense: {license}\nlibrary_name: timm\n---\n# teacher\n")
    return folder


def tiny_hf(kind: str, seed: int, labels=LABELS):
    """A tiny one-channel transformers ResNet or ViT image classifier."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    label_kwargs = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    if kind == "resnet":
        config = ResNetConfig(
            num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **label_kwargs
        )
        return ResNetForImageClassification(config).eval()
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        **label_kwargs,
    )
    return ViTForImageClassification(config).eval()


def save_hf(model, folder: Path, license: str | None = "mit") -> Path:
    """A transformers repo folder with an image processor (PIL backend) and a README license."""
    from transformers import ConvNextImageProcessorPil, ViTImageProcessorPil

    model.save_pretrained(folder)
    if model.config.model_type == "vit":
        processor = ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    else:
        processor = ConvNextImageProcessorPil(
            size={"shortest_edge": 16}, crop_pct=1.0, image_mean=[0.5], image_std=[0.5]
        )
    processor.save_pretrained(folder)
    if license:
        (folder / "README.md").write_text(f"---\nlicense: {license}\n---\n# teacher\n")
    return folder


class RepoSet:
    """Fixture teacher repos: ids, commit shas and the in-memory models they were saved from."""

    def __init__(self):
        self.ids: list[str] = []
        self.shas: list[str] = []
        self.models: list = []


@pytest.fixture(scope="session")
def timm_repos(hub, tmp_path_factory) -> RepoSet:
    """Three timm teachers served as testorg/timm-a, -b, -c (licence apache-2.0)."""
    repos = RepoSet()
    for i, name in enumerate("abc"):
        model = tiny_timm(i)
        folder = save_timm(model, tmp_path_factory.mktemp(f"timm-{name}"))
        repos.ids.append(f"testorg/timm-{name}")
        repos.shas.append(hub.add_repo(repos.ids[-1], folder))
        repos.models.append(model)
    return repos


@pytest.fixture(scope="session")
def hf_repos(hub, tmp_path_factory) -> dict[str, RepoSet]:
    """Two transformers ResNets (testorg/hf-resnet-a, -b) and two ViTs (testorg/hf-vit-a, -b)."""
    out = {}
    for kind in ("resnet", "vit"):
        repos = RepoSet()
        for i, name in enumerate("ab"):
            model = tiny_hf(kind, 10 + i)
            folder = save_hf(model, tmp_path_factory.mktemp(f"hf-{kind}-{name}"))
            repos.ids.append(f"testorg/hf-{kind}-{name}")
            repos.shas.append(hub.add_repo(repos.ids[-1], folder))
            repos.models.append(model)
        out[kind] = repos
    return out
