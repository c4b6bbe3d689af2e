"""bf16 products on CPUs without bf16 matrix kernels (icl_core.precision): fp32 products of the
bf16-rounded inputs, rounded to bf16 — the native bf16 product's numbers at fp32 speed."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from icl_core import precision
from icl_core.model import linear_cross_entropy
from icl_core.train import Trainer

from tests.conftest import tiny_model

BF16 = torch.bfloat16


@pytest.fixture
def emulated():
    was = precision._library is not None
    precision.install(force=True)
    yield
    if not was:
        precision.uninstall()


@pytest.fixture
def native():
    was = precision._library is not None
    precision.uninstall()
    yield
    if was:
        precision.install(force=True)


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the matrix products that reach the kernels (below autocast)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("mm", "bmm", "baddbmm", "addmm"):
            self.seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


def _products(a, b, bias):
    return {"mm": a @ b, "matmul3d": a[None].expand(2, -1, -1) @ b,
            "bmm": torch.bmm(a[None], b[None]), "baddbmm": torch.baddbmm(bias[None], a[None], b[None]),
            "addmm": torch.addmm(bias, a, b), "linear": torch.nn.functional.linear(a, b.t(), bias[0])}


def test_emulated_products_are_fp32_products_of_rounded_inputs(emulated):
    g = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(48, 96, generator=g), torch.randn(96, 40, generator=g), torch.randn(48, 40, generator=g)
    with _MatmulDtypes() as seen, torch.autocast("cpu", dtype=BF16):
        got = _products(a, b, bias)
    assert seen.seen and all(s == {torch.float32} for s in seen.seen)  # the kernels ran in fp32
    ar, br, biasr = (t.to(BF16).float() for t in (a, b, bias))
    want = {"mm": ar @ br, "matmul3d": (ar @ br)[None].expand(2, -1, -1), "bmm": (ar @ br)[None],
            "baddbmm": torch.baddbmm(biasr[None], ar[None], br[None]), "addmm": torch.addmm(biasr, ar, br),
            "linear": torch.nn.functional.linear(ar, br.t(), biasr[0])}
    for k in got:
        assert got[k].dtype == BF16, k  # as autocast's own kernels return
        assert torch.equal(got[k], want[k].to(BF16)), k


def test_emulated_products_equal_native_bf16_to_rounding(emulated):
    g = torch.Generator().manual_seed(1)
    a, b, bias = torch.randn(64, 128, generator=g), torch.randn(128, 32, generator=g), torch.randn(64, 32, generator=g)
    with torch.autocast("cpu", dtype=BF16):
        emu = _products(a, b, bias)
    precision.uninstall()
    try:
        with _MatmulDtypes() as seen, torch.autocast("cpu", dtype=BF16):
            nat = _products(a, b, bias)
        assert seen.seen and all(s == {BF16} for s in seen.seen)  # uninstalled: PyTorch's bf16 kernels
    finally:
        precision.install(force=True)
    for k in emu:
        # the same exact products, summed in another order in fp32, then rounded: at most one bf16 ulp
        ulp = nat[k].float().abs().clamp_min(1.0) * 2 ** -7
        assert ((emu[k].float() - nat[k].float()).abs() <= ulp).all(), k


def test_model_loss_and_gradients_match_native_bf16(native):
    torch.manual_seed(0)
    model = tiny_model(d_vocab=300)
    x = torch.randint(0, 300, (4, 64))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=BF16):
            loss = model(x, return_loss=True)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    nat_loss, nat_grads = loss_and_grads()
    precision.install(force=True)
    try:
        emu_loss, emu_grads = loss_and_grads()
        with _MatmulDtypes() as seen, torch.autocast("cpu", dtype=BF16):
            h = torch.randn(2, 8, 32)
            linear_cross_entropy(h, model.W_U, x[:2, :8])  # the loss's explicit bf16 products, outside autocast
    finally:
        precision.uninstall()
    assert all(s == {torch.float32} for s in seen.seen) and len(seen.seen) >= 1
    assert abs(emu_loss.item() - nat_loss.item()) < 1e-4 * nat_loss.item()
    for n, g in nat_grads.items():  # gradients rounded to bf16 either way: within a couple of bf16 ulps
        assert (emu_grads[n] - g).abs().max() <= 2 ** -6 * g.abs().max() + 1e-8, n


def test_a_run_trained_with_emulated_products_logs_it_and_learns_as_native(tiny_run_cfg, tmp_path, native):
    nat = Trainer(tiny_run_cfg, tmp_path / "native", compile=False).run(progress=False)
    precision.install(force=True)
    try:
        emu = Trainer(tiny_run_cfg, tmp_path / "emulated", compile=False).run(progress=False)
    finally:
        precision.uninstall()
    assert nat["bf16_matmul"] == "native bf16" and emu["bf16_matmul"] == "fp32 of bf16-rounded inputs"
    a, b = [v for _, v in nat["train_log"]], [v for _, v in emu["train_log"]]
    assert a[-1] < a[0] - 0.1  # it learned, so the comparison is not of two constants
    assert max(abs(x - y) for x, y in zip(a, b)) < 2e-2  # rounding-level differences, compounded over 20 steps


def test_compiled_loss_takes_the_emulated_products(emulated, tiny_run_cfg):
    from icl_core.train import init_model, make_loss
    model = init_model(tiny_run_cfg)
    x = torch.randint(0, 300, (2, 128))
    eager = make_loss(model, tiny_run_cfg, "cpu", compile=False)(x)
    compiled = make_loss(model, tiny_run_cfg, "cpu", compile=True)
    with _MatmulDtypes() as seen:  # the compiled graph's matrix products run below the mode as fp32 kernels
        got = compiled(x)
    assert abs(got.item() - eager.item()) < 1e-2
    assert seen.seen and all(s == {torch.float32} for s in seen.seen)  # with native kernels: all bf16


def test_choice_follows_the_environment(monkeypatch):
    monkeypatch.setenv(precision.ENV, "emulated")
    assert precision.emulating()
    monkeypatch.setenv(precision.ENV, "native")
    assert not precision.emulating()
    monkeypatch.setenv(precision.ENV, "auto")
    assert precision.emulating() == (not precision.native_bf16_matmul())
    monkeypatch.setenv(precision.ENV, "fast")
    with pytest.raises(ValueError, match="ICL_BF16_MATMUL='fast' is not auto, native or emulated"):
        precision.emulating()
