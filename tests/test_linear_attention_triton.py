"""The Triton kernels of kernels/linear_attention_triton.py against the torch chunked scan (itself held to the
quadratic reference in test_linear_attention.py): causal attention with and without a carried state, the fused
FAVOR+ and elu+1 feature maps, forward and gradients, and the cores' dispatch (backend=triton vs chunked,
decoding from the kernel's state).

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, see _import_kernels) on tiny float32
shapes (~10 s); tl.dot on bf16 is not exact there, so bf16 is tested only on the GPU (marked `gpu`), where the
float32 tests run compiled. Skipped when triton is not installed."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernels import linear_attention as la  # noqa: E402
from zoo.blocks.cores import build_core  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _import_kernels():
    """On CPU, Triton must run under TRITON_INTERPRET=1 from its own import on: its library functions (tl.zeros,
    tl.sum) are decorated when triton is imported and it checks the variable again lazily, while torch imports
    triton early (torch._dynamo looks for it). So the variable is set for the rest of the process (on a machine
    without CUDA nothing else can run Triton anyway) and a copy imported without it is dropped and imported
    again; the compiled extension stays (it cannot load twice)."""
    name = "kernels.linear_attention_triton"
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        for mod in [m for m in sys.modules if m in (name, "triton")
                    or (m.startswith("triton.") and not m.startswith("triton._C"))]:
            del sys.modules[mod]
    module = importlib.import_module(name)
    if not CUDA:
        _let_the_interpreter_take_runtime_loop_bounds()
    return module


def _let_the_interpreter_take_runtime_loop_bounds():
    """Triton 3.6's interpreter turns a scalar into an int with int() of a one-element array, which NumPy >= 2.4
    refuses (`range(NC)` then fails); take the element instead. Interpreter only: compiled kernels never see it."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_zoo", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    patched._zoo = True
    interpreter._patch_lang_tensor = patched


lat = _import_kernels()


def rand(*shape, dtype=torch.float32, seed=0, positive=False, device=DEV):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g, dtype=torch.float64) if positive else torch.randn(*shape, generator=g,
                                                                                          dtype=torch.float64)
    return x.to(device=device, dtype=dtype).requires_grad_()


def grads(out_and_state, inputs, seed=9):
    """Gradients of a random projection of the output and of the final state (so their gradients are used)."""
    out, (s, z) = out_and_state
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in (out, s, z)]
    loss = (out * w[0]).sum() + (s * w[1]).sum() + (z * w[2]).sum()
    return torch.autograd.grad(loss, inputs)


def close(a, b, tol):
    torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("n,m,dv,chunk,segment,with_state", [
    (50, 80, 24, 16, 2, False), (50, 80, 24, 16, 3, True), (50, 80, 24, 16, 1, False),
    (16, 16, 16, 16, 16, False), (7, 20, 8, 16, 16, True)])
def test_causal_kernel_equals_torch_scan_fp32(n, m, dv, chunk, segment, with_state):
    """Lengths that are not multiples of the chunk, a feature count over two tiles (the second partial), a value
    size below the tile, state scans split into segments (the last one short); with a carried state, its
    gradient and the final state's own gradient."""
    b, h = 2, 2
    q, k = rand(b, h, n, m, positive=True, seed=1), rand(b, h, n, m, positive=True, seed=2)
    v = rand(b, h, n, dv, seed=3)
    ins = [q, k, v]
    state = None
    if with_state:
        state = (rand(b, h, m, dv, seed=4), rand(b, h, m, positive=True, seed=5))
        ins += list(state)
    got = lat.causal_linear_attention(q, k, v, state, chunk=chunk, segment=segment)
    want = la.linear_attention(q, k, v, causal=True, chunk_size=chunk, state=state, impl="chunked")
    for a, b_ in zip((got[0], *got[1]), (want[0], *want[1])):
        close(a, b_, 1e-5)
    for a, b_ in zip(grads(got, ins), grads(want, ins)):
        close(a, b_, 1e-5)


def test_keys_that_are_all_padding_give_zeros_not_nan():
    q = rand(1, 1, 20, 16, positive=True, seed=1)
    k = rand(1, 1, 20, 16, positive=True, seed=2).detach().clone()
    k[:, :, :5] = 0  # the first five queries see no key
    k.requires_grad_()
    v = rand(1, 1, 20, 16, seed=3)
    got = lat.causal_linear_attention(q, k, v, chunk=16)
    want = la.linear_attention(q, k, v, causal=True, chunk_size=16, impl="chunked")
    assert torch.equal(got[0][:, :, :5], torch.zeros_like(got[0][:, :, :5]))
    close(got[0], want[0], 1e-5)
    for a, b_ in zip(grads(got, [q, k, v]), grads(want, [q, k, v])):
        assert torch.isfinite(a).all()
        close(a, b_, 1e-5)


def favor_case(b, h, n, d, m, pad=None):
    """Queries, keys, values (b, h, n, d), an m-feature projection, and a key mask that pads batch row pad[0] from
    position pad[1] on (None: no mask)."""
    q, k, v = rand(b, h, n, d, seed=1), rand(b, h, n, d, seed=2), rand(b, h, n, d, seed=3)
    mask = None
    if pad is not None:
        mask = torch.ones(b, n, dtype=torch.bool, device=DEV)
        mask[pad[0], pad[1]:] = False
    return q, k, v, la.random_projection(m, d, seed=0).to(DEV), mask


@pytest.mark.parametrize("masked,tiles", [(False, None), (True, None), (False, (32, 128)), (False, (128, 32))])
def test_fused_favor_features_equal_torch_features_fp32(masked, tiles, monkeypatch):
    """Features forward; gradients end to end through the attention (the offsets are constants to the kernel's
    gradient, exactly so for the attention output, not for the features alone)."""
    if tiles:  # the other FAVOR+ tiles that scripts/tune_linear_kernels.py compare=true times
        monkeypatch.setattr(lat, "FAVOR_ROWS", tiles[0])
        monkeypatch.setattr(lat, "FAVOR_FEATURES", tiles[1])
    # two feature tiles, the second partial; one tile (ONE_TILE) at 128 features
    q, k, v, proj, mask = favor_case(2, 2, 40, 16, 80, pad=(1, 25) if masked else None)
    ft, fr = (la.favor_features(q, k, proj, mask, impl=i) for i in ("triton", "chunked"))
    for a, b_ in zip(ft, fr):
        close(a, b_, 1e-5)
    for causal in (True, False):
        outs = [la.linear_attention(f[0], f[1], v, causal=causal, impl=i)[0] for f, i in ((ft, "triton"),
                                                                                          (fr, "chunked"))]
        close(outs[0], outs[1], 1e-5)
        w = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(5)).to(outs[0])
        for a, b_ in zip(*(torch.autograd.grad((o * w).sum(), [q, k, v], retain_graph=True) for o in outs)):
            close(a, b_, 1e-4)


@pytest.mark.parametrize("masked,tiles", [(False, None), (True, None), (False, (32, 64))])
def test_one_node_causal_favor_attention_equals_the_torch_path_fp32(masked, tiles, monkeypatch):
    """The training path's fused node (features and attention, dphi * phi handed from the chunk kernel to the
    features' backward) against torch features and scan; with padded keys it takes the two-node path."""
    if tiles:  # the chunk kernels' other feature tiles that scripts/tune_linear_kernels.py compare=true times
        monkeypatch.setattr(lat, "OUT_TILE", tiles[0])
        monkeypatch.setattr(lat, "BWD_TILE", tiles[1])
    # three chunks of 64, the last partial; 80 features: tiles of 64 or 32, the last partial
    q, k, v, proj, mask = favor_case(1, 2, 150, 16, 80, pad=(0, 100) if masked else None)
    outs = [la.causal_favor_attention(q, k, v, proj, mask, impl=i) for i in ("triton", "chunked")]
    close(outs[0], outs[1], 1e-5)
    w = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(5)).to(outs[0])
    for a, b_ in zip(*(torch.autograd.grad((o * w).sum(), [q, k, v]) for o in outs)):
        close(a, b_, 1e-4)


def test_fused_elu_features_equal_torch_features_fp32():
    x = (rand(3, 700, seed=1) * 20).detach().requires_grad_()  # reaches past the e^-30 floor, over two blocks
    got, want = la.elu_features(x, impl="triton"), la.elu_features(x, impl="chunked")
    close(got, want, 1e-6)
    w = rand(3, 700, seed=2).detach()
    close(*(torch.autograd.grad((f * w).sum(), x, retain_graph=True)[0] for f in (got, want)), 1e-6)


@pytest.mark.parametrize("name,options", [("performer", {}), ("linear", {}), ("performer", {"kernel": "relu"})])
def test_core_triton_backend_equals_chunked_and_decodes(name, options):
    torch.manual_seed(0)
    cores = {i: build_core(name, causal=True, backend=i, nb_features=32, seed=1, **options)
             if name == "performer" else build_core(name, causal=True, backend=i) for i in ("triton", "chunked")}
    q, k, v = rand(1, 2, 37, 16, seed=1), rand(1, 1, 37, 16, seed=2), rand(1, 1, 37, 16, seed=3)  # MQA
    outs = {i: c.to(DEV).eval()(q, k, v) for i, c in cores.items()}
    close(outs["triton"], outs["chunked"], 1e-5)
    for a, b_ in zip(*(torch.autograd.grad(o.square().sum(), [q, k, v]) for o in outs.values())):
        close(a, b_, 1e-4)
    # prefill 20 tokens, then one at a time, from the kernel's returned state
    cache, steps = {}, []
    for a, b_ in [(0, 20)] + [(i, i + 1) for i in range(20, 37)]:
        steps.append(cores["triton"](q[:, :, a:b_], k[:, :, a:b_], v[:, :, a:b_], cache=cache))
    close(torch.cat(steps, 2), outs["chunked"], 1e-5)


@pytest.mark.parametrize("name", ["performer", "linear"])
@pytest.mark.parametrize("recompute", [False, True])
def test_encoder_core_with_triton_features_equals_the_torch_path(name, recompute):
    """Bidirectional attention from the Triton feature kernels, through the stored node (the features kept as the
    kernels give them) or the recomputing one, against the torch path (torch features; the nodes themselves are
    held to plain autograd in test_linear_attention.py)."""
    opts = {"nb_features": 32, "seed": 1} if name == "performer" else {}
    got = build_core(name, causal=False, backend="triton", recompute=recompute, **opts).to(DEV)
    want = build_core(name, causal=False, backend="chunked", **opts).to(DEV)
    q, k, v = rand(2, 2, 45, 16, seed=1), rand(2, 2, 45, 16, seed=2), rand(2, 2, 45, 16, seed=3)
    mask = torch.ones(2, 45, dtype=torch.bool, device=DEV)
    mask[1, 30:] = False
    outs = [c(q, k, v, key_padding_mask=mask) for c in (got, want)]
    close(outs[0], outs[1], 1e-5)
    for a, b_ in zip(*(torch.autograd.grad(o.square().sum(), [q, k, v]) for o in outs)):
        close(a, b_, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [False, True])
def test_bf16_encoder_performer_on_gpu_matches_the_torch_path(recompute):
    """The LRA encoder's shape in bf16: the Triton features come back in bf16 and the stored node keeps them so."""
    got = build_core("performer", causal=False, backend="triton", recompute=recompute, seed=1).cuda()
    want = build_core("performer", causal=False, backend="chunked", seed=1).cuda()
    q, k, v = (rand(2, 8, 2048, 64, seed=s, dtype=torch.bfloat16, device="cuda") for s in (1, 2, 3))
    outs = [c(q, k, v) for c in (got, want)]
    for a, b_ in zip([outs[0]] + list(torch.autograd.grad(outs[0].float().square().sum(), [q, k, v])),
                     [outs[1]] + list(torch.autograd.grad(outs[1].float().square().sum(), [q, k, v]))):
        err = ((a.float() - b_.float()).abs().max() / b_.float().abs().max()).item()
        assert err < 5e-2, err


def test_bad_impl_names_the_choices():
    x = torch.ones(1, 1, 2, 4)
    with pytest.raises(ValueError, match="valid choices: auto, chunked, triton"):
        la.linear_attention(x, x, x, causal=True, impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2000, 4096])
def test_bf16_kernels_on_gpu_match_the_fp32_torch_scan(n):
    """The training shape: bf16 queries/keys/values, 256 FAVOR+ features of head size 128. The reference is the
    torch path on the same bf16 inputs (features and scan in fp32); errors are relative to the largest entry."""
    b, h, d, m = 1, 4, 128, 256
    q, k, v = (rand(b, h, n, d, seed=s, dtype=torch.bfloat16, device="cuda") for s in (1, 2, 3))
    proj = la.random_projection(m, d, seed=0).bfloat16().float().cuda()  # the kernel's (bf16) directions for both
    res = {}
    for impl in ("triton", "chunked"):
        phi_q, phi_k, _ = la.favor_features(q, k, proj, impl=impl)
        out, _ = la.linear_attention(phi_q, phi_k, v, causal=True, impl=impl)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).cuda()
        res[impl] = (out.float(), *torch.autograd.grad((out.float() * w).sum(), [q, k, v]))
    out = la.causal_favor_attention(q, k, v, proj, impl="triton")  # the training path's one fused node
    res["fused"] = (out.float(), *torch.autograd.grad((out.float() * w).sum(), [q, k, v]))
    for what, a, b_ in [(f"{what} {impl}", a, b_) for impl in ("triton", "fused")
                        for what, a, b_ in zip(("out", "dq", "dk", "dv"), res[impl], res["chunked"])]:
        err = ((a.float() - b_.float()).abs().max() / b_.float().abs().max()).item()
        rel = ((a.float() - b_.float()).norm() / b_.float().norm()).item()
        print(f"n={n} {what}: max error {err:.2e} of the largest entry, relative norm error {rel:.2e}")
        # measured on an H200: max errors 0.4-2.2e-2, norm errors 0.3-0.9e-2 (dk the largest: bf16 features, bf16
        # chunk states, and the segment prefix rounded once more); a missing term or a wrong sign gives O(1)
        assert err < 5e-2 and rel < 2e-2, (what, err, rel)


def test_the_tuning_scripts_other_paths_give_the_same_result_and_are_restored():
    """scripts/tune_linear_kernels.py times the two-node path and an older kernels file through `path`: both
    must compute what the fused path does, and leave the fused path in place afterwards."""
    from scripts.tune_linear_kernels import load_kernels, path
    from zoo.blocks.linear_cores import PerformerCore
    core = build_core("performer", causal=True, backend="triton", nb_features=32, seed=1).to(DEV).eval()
    q, k, v = rand(1, 2, 70, 16, seed=1), rand(1, 2, 70, 16, seed=2), rand(1, 2, 70, 16, seed=3)
    fused, attend = core(q, k, v), PerformerCore.attend
    with path(True):
        close(core(q, k, v), fused, 1e-5)
    with path(True, load_kernels(lat.__file__)):
        assert la._triton() is not lat and PerformerCore.attend is not attend
        close(core(q, k, v), fused, 1e-5)
    assert PerformerCore.attend is attend and la._triton() is lat


@pytest.mark.parametrize("argv,match", [(["variants=maybe"], "variants='maybe'; valid choices: true, false"),
                                        (["rounds=0"], "rounds=0 must be a positive integer"),
                                        (["other=/no/such/file.py"], "other='/no/such/file.py': not a file")])
def test_the_tuning_script_names_a_bad_argument(argv, match):
    from scripts.tune_linear_kernels import main
    with pytest.raises(SystemExit, match=match):
        main(argv)


def test_the_tuning_scripts_variants_name_settings_the_kernels_module_has():
    """compare=true sets each variant's names on the kernels module: a misspelt name would time the defaults
    under the variant's label. A LAUNCH variant names kernels that LAUNCH has, as (warps, stages)."""
    from scripts.tune_linear_kernels import VARIANTS
    for name, change in VARIANTS.items():
        for key, value in change.items():
            assert hasattr(lat, key) and key.isupper(), (name, key)
            if key == "LAUNCH":
                assert set(value) <= set(lat.LAUNCH) and all(len(v) == 2 for v in value.values()), name
