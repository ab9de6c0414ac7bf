"""Every input layout the torch op accepts, under torch.compile forward + backward.

The op returns contiguous tensors (out, lse and every gradient) whatever the inputs' strides, and its
fake implementations promise exactly that; a mismatch makes compiled graphs fail ("incorrect fake
kernel") or read results with wrong strides. Each layout is checked three ways: the eager outputs are
contiguous, ``torch.library.opcheck`` passes on both custom ops, and a compiled loss (inductor, the
view/transpose inside the graph as a model writes it) equals eager in its value and every gradient.
The transformer, whose projections are transposed views, is trained compiled against eager.
"""
import copy

import pytest

torch = pytest.importorskip("torch")

import cupy_cosattn.torch as cat  # noqa: E402
from cupy_cosattn.transformer import CosineSimCausalTransformer  # noqa: E402

B, H, HK, NQ, NK, D = 2, 4, 2, 9, 11, 16


def _randn(g, *shape):
    return torch.randn(shape, generator=g)


def _heads(x, n, h):
    """(B, n, h·D) projection output -> (B, h, n, D): a transposed, non-contiguous view."""
    return x.view(x.shape[0], n, h, D).transpose(1, 2)


# name -> (make leaves from a generator, build the op's inputs from the leaves). The build step runs
# inside the compiled function, so views, transposes and expands are part of the traced graph.
LAYOUTS = {
    "contiguous": (
        lambda g: dict(q=_randn(g, B, H, NQ, D), k=_randn(g, B, H, NK, D), v=_randn(g, B, H, NK, D)),
        lambda t: dict(q=t["q"], k=t["k"], v=t["v"])),
    "transposed": (
        lambda g: dict(xq=_randn(g, B, NQ, H * D), xk=_randn(g, B, NK, H * D), xv=_randn(g, B, NK, H * D)),
        lambda t: dict(q=_heads(t["xq"], NQ, H), k=_heads(t["xk"], NK, H), v=_heads(t["xv"], NK, H))),
    "expanded-kv": (  # one kv head broadcast over the query heads: head stride 0
        lambda g: dict(xq=_randn(g, B, NQ, H * D), k=_randn(g, B, 1, NK, D), v=_randn(g, B, 1, NK, D)),
        lambda t: dict(q=_heads(t["xq"], NQ, H), k=t["k"].expand(B, H, NK, D), v=t["v"].expand(B, H, NK, D))),
    "broadcast-batch-kv": (  # kv shared by the batch: batch stride 0
        lambda g: dict(q=_randn(g, B, H, NQ, D), k=_randn(g, 1, H, NK, D), v=_randn(g, 1, H, NK, D)),
        lambda t: dict(q=t["q"], k=t["k"].expand(B, H, NK, D), v=t["v"].expand(B, H, NK, D))),
    "gqa-transposed": (
        lambda g: dict(xq=_randn(g, B, NQ, H * D), xk=_randn(g, B, NK, HK * D), xv=_randn(g, B, NK, HK * D)),
        lambda t: dict(q=_heads(t["xq"], NQ, H), k=_heads(t["xk"], NK, HK), v=_heads(t["xv"], NK, HK))),
    "merged-3d": (  # (BH, N, D) views of (N, BH, D) storage
        lambda g: dict(q=_randn(g, NQ, B * H, D), k=_randn(g, NK, B * H, D), v=_randn(g, NK, B * H, D)),
        lambda t: dict(q=t["q"].transpose(0, 1), k=t["k"].transpose(0, 1), v=t["v"].transpose(0, 1))),
    "kv-3d": (  # one shared kv head as (B, Nk, D): k transposed, v expanded over the batch
        lambda g: dict(xq=_randn(g, B, NQ, H * D), k=_randn(g, NK, B, D), v=_randn(g, 1, NK, D)),
        lambda t: dict(q=_heads(t["xq"], NQ, H), k=t["k"].transpose(0, 1), v=t["v"].expand(B, NK, D))),
    "bias-mask-scale": (  # transposed q, k, v; a transposed per-head bias; a per-head scale tensor
        lambda g: dict(xq=_randn(g, B, NQ, H * D), xk=_randn(g, B, NK, H * D), xv=_randn(g, B, NK, H * D),
                       bias=_randn(g, H, NK, NQ), scale=torch.rand(H, generator=g) * 6 + 2),
        lambda t: dict(q=_heads(t["xq"], NQ, H), k=_heads(t["xk"], NK, H), v=_heads(t["xv"], NK, H),
                       attn_bias=t["bias"].transpose(-1, -2), scale=t["scale"])),
    "expanded-batch-bias": (  # a full (B, H, Nq, Nk) bias that is one (H, Nq, Nk) block expanded
        lambda g: dict(xq=_randn(g, B, NQ, H * D), xk=_randn(g, B, NK, H * D), xv=_randn(g, B, NK, H * D),
                       bias=_randn(g, 1, H, NQ, NK)),
        lambda t: dict(q=_heads(t["xq"], NQ, H), k=_heads(t["xk"], NK, H), v=_heads(t["xv"], NK, H),
                       attn_bias=t["bias"].expand(B, H, NQ, NK))),
}


def _mask(batch):
    m = torch.rand((batch, NK), generator=torch.Generator().manual_seed(5)) > 0.3
    m[:, 0] = True
    return m.t().contiguous().t()  # a (B, Nk) view of (Nk, B) storage


def _leaves(name):
    make, _ = LAYOUTS[name]
    return {n: x.requires_grad_() for n, x in make(torch.Generator().manual_seed(0)).items()}


def _loss_fn(name):
    _, build = LAYOUTS[name]

    def f(leaves, weight, mask):
        out, lse = cat.forward(causal=True, mask=mask, **build(leaves))
        # a weighted sum, so that no gradient vanishes by symmetry; lse is returned to check its strides
        return (out * weight).sum(), out, lse

    return f


def _weight(name):
    _, build = LAYOUTS[name]
    q = build(_leaves(name))["q"]
    return torch.randn(q.shape, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_eager_outputs_and_gradients_are_contiguous(name, backend):
    """What the fake implementations promise, for the real ones on every layout: the torch CPU
    implementation and the kernel backends' glue (run here with the reference)."""
    kw = LAYOUTS[name][1](_leaves(name))
    out, lse = cat.forward(causal=True, backend=backend, **kw)
    assert out.is_contiguous() and lse.is_contiguous()
    inputs = [x for n, x in kw.items() if n in ("q", "k", "v", "attn_bias", "scale")]
    assert any(not x.is_contiguous() for x in inputs) == (name not in ("contiguous",))
    grads = torch.autograd.grad((out * _weight(name)).sum(), inputs)
    for g, x in zip(grads, inputs):
        assert g.shape == x.shape and g.is_contiguous(), (g.shape, g.stride())


def _op_args(name, with_mask):
    kw = LAYOUTS[name][1]({n: x.detach() for n, x in _leaves(name).items()})
    q = kw["q"]
    scale = kw.get("scale")
    fwd = (q, kw["k"], kw["v"], _mask(q.shape[0]) if with_mask else None, kw.get("attn_bias"), scale,
           8.0 if scale is None else 1.0, False, 1, True, True, False)
    return fwd


@pytest.mark.parametrize("name", ["transposed", "expanded-kv", "merged-3d", "kv-3d", "bias-mask-scale",
                                  "expanded-batch-bias"])
def test_opcheck_on_layouts(name):
    """Schema, fake vs real (shapes, dtypes and strides), autograd registration and AOT dispatch of
    both custom ops, on inputs of this layout."""
    fwd = _op_args(name, with_mask=name == "bias-mask-scale")
    grad_fwd = tuple(t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                     for t in fwd)
    torch.library.opcheck(torch.ops.cupy_cosattn.attn_fwd.default, grad_fwd)
    out, lse = torch.ops.cupy_cosattn.attn_fwd(*fwd)
    # a non-contiguous dout: out's shape over reversed storage
    dout = torch.randn(out.shape[::-1], generator=torch.Generator().manual_seed(2)).permute(*range(out.ndim)[::-1])
    torch.library.opcheck(torch.ops.cupy_cosattn.attn_bwd.default, (dout,) + fwd[:3] + (out, lse) + fwd[3:])


def _compiled_equals_eager(name, device):
    f = _loss_fn(name)
    weight = _weight(name).to(device)
    mask = _mask(weight.shape[0]).to(device) if name in ("bias-mask-scale", "kv-3d") else None
    leaves = {n: x.detach().to(device).requires_grad_() for n, x in _leaves(name).items()}
    loss, out, lse = f(leaves, weight, mask)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    cleaves = {n: x.detach().clone().requires_grad_() for n, x in leaves.items()}
    closs, cout, clse = compiled(cleaves, weight, mask)
    cgrads = torch.autograd.grad(closs, list(cleaves.values()))
    torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cout, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clse, lse, rtol=1e-5, atol=1e-6)
    for n, a, b in zip(leaves, cgrads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"gradient of {n}: {m}")


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.* is deprecated:DeprecationWarning")  # torch internals
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_compiled_forward_backward_equals_eager(name):
    """inductor, fullgraph: the compiled loss, out, lse and every leaf's gradient equal eager's."""
    _compiled_equals_eager(name, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_gpu_compiled_forward_backward_equals_eager(name):
    """The same on CUDA tensors: the fused kernels' outputs and gradients, compiled and eager."""
    _compiled_equals_eager(name, torch.device("cuda"))


def _train(model, steps, device, seed=0):
    """Losses of `steps` Adam steps on random byte sequences (the same batches for every model)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 17), generator=gen).to(device)
        loss = model(x, return_loss=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _compiled_training_matches_eager(device):
    torch.manual_seed(0)
    model = CosineSimCausalTransformer(num_tokens=64, dim=32, max_seq_len=16, depth=2, heads=4, dim_head=8,
                                       kv_heads=2, learned_scale=True, attn_scale=10.0, pre_norm=True).to(device)
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(twin)
    eager_losses = _train(model, 3, device)
    compiled_losses = _train(compiled, 3, device)
    assert all(map(lambda x: x == x, compiled_losses))  # no NaN
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=2e-4, atol=2e-4)
    for (n, a), b in zip(twin.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"{n} after 3 steps: {m}")


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.* is deprecated:DeprecationWarning")  # torch internals
def test_compiled_transformer_trains_like_eager_on_cpu():
    """torch.compile(model): its attention takes transposed projections (and GQA, a learned scale)."""
    _compiled_training_matches_eager(torch.device("cpu"))


@pytest.mark.gpu
def test_compiled_transformer_trains_like_eager_on_gpu():
    _compiled_training_matches_eager(torch.device("cuda"))
