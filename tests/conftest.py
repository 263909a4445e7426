import os
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("M3JAX_HOME", tempfile.mkdtemp(prefix="m3jax-test-home-"))  # caches stay out of ~/.cache
# The test extra installs libtpu (the TPU compile tier). With no TPU or GPU here, keep every test process (and its
# subprocesses) off libtpu's TPU discovery: compile-only TPU devices need no TPU backend.
if not any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio", "/dev/nvidia0")):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from m3jax.config import M3Config  # noqa: E402
from m3jax.testing import write_random_release  # noqa: E402

TINY = {
    "tiny": M3Config.tiny(),
    # A different shape in every dimension, and a ColBERT head narrower than the hidden size.
    "tiny_narrow_colbert": M3Config.tiny(hidden_size=48, num_layers=3, num_heads=6, intermediate_size=80,
                                         colbert_dim=24),
}


@pytest.fixture(scope="session")
def release_dirs(tmp_path_factory):
    """{name: release-layout directory}: tiny configs, both weight formats, a roberta.-prefixed variant."""
    root = tmp_path_factory.mktemp("release")
    out = {
        "tiny": write_random_release(root / "tiny", TINY["tiny"], seed=1, weights_format="safetensors"),
        "tiny_bin": write_random_release(root / "tiny_bin", TINY["tiny"], seed=2, weights_format="bin"),
        "tiny_narrow_colbert": write_random_release(root / "narrow", TINY["tiny_narrow_colbert"], seed=3),
        "tiny_prefixed": write_random_release(root / "prefixed", TINY["tiny"], seed=4, roberta_prefix=True),
    }
    out["tiny_spread_colbert"] = spread_colbert(out["tiny"], root / "spread")
    return out


def spread_colbert(src, dst):
    """A copy of src whose ColBERT head projects out the hidden states' common direction (bias 0), so token
    vectors point every way and negative dot products, hence FlagEmbedding's zero floor, really occur."""
    import shutil

    import torch
    from transformers import AutoTokenizer, XLMRobertaModel

    from tests.helpers import SENTENCES

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    with torch.no_grad():
        h = XLMRobertaModel.from_pretrained(dst).eval()(**tok(SENTENCES, padding=True, return_tensors="pt"))[0]
    u = h.reshape(-1, h.shape[-1]).mean(0)
    u = u / u.norm()
    head = torch.load(dst / "colbert_linear.pt", weights_only=True)
    w = head["weight"].float() @ (torch.eye(len(u)) - torch.outer(u, u))
    torch.save({"weight": w.half(), "bias": torch.zeros_like(head["bias"])}, dst / "colbert_linear.pt")
    return dst


@pytest.fixture(scope="session")
def flag_model_factory():
    """Builds FlagEmbedding's BGEM3FlagModel in exact fp32 on CPU, cached per directory."""
    import FlagEmbedding  # a hard dependency of the test extra: missing it must fail, not skip

    cache = {}

    def make(path, colbert_dim=-1):
        key = (str(path), colbert_dim)
        if key not in cache:
            cache[key] = FlagEmbedding.BGEM3FlagModel(str(path), use_fp16=False, devices="cpu",
                                                      colbert_dim=colbert_dim)
        return cache[key]

    return make
