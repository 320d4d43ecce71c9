"""The training fast paths against their plain references (scripts/bench_gpt124m.py measures their speed).

- the loss compiled together with the network (zoo.tasks.language_modeling.token_loss) == the eager loss;
- SDPA as the model calls it on the GPU (cuDNN on Hopper) == the reference attention;
- the sync-free NaN check still stops the run, and never lets a checkpoint through after a bad loss;
- bf16-mixed with fused AdamW can clip gradients; compiled wrappers stay out of the state dict.
"""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

import kernels
import zoo
from zoo.tasks import CausalLM, NonFiniteLossError
from zoo.tasks.language_modeling import token_cross_entropy, token_loss

TINY = dict(vocab_size=64, max_seq_len=32, d_model=32, n_layers=2, n_heads=4)


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_compiled_token_loss_equals_eager_loss_and_grads():
    net = zoo.build_model("gpt", **TINY)
    ids = torch.randint(0, 64, (3, 17))  # a length that is not a power of two
    labels = torch.randint(0, 64, (3, 17))
    labels[0, :5] = -100  # ignored positions
    ref = token_loss(net, ids, None, labels)
    ref.backward()
    ref_grads = _grads(net)
    net.zero_grad(set_to_none=True)
    # the plain path is the documented formula
    assert torch.allclose(ref, token_cross_entropy(net(ids), labels))
    fast = torch.compile(token_loss)(net, ids, None, labels)
    fast.backward()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    fast_grads = _grads(net)
    assert fast_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_token_loss_has_no_graph_break():
    net = zoo.build_model("gpt", **TINY)
    ids = torch.randint(0, 64, (2, 16))
    explained = torch._dynamo.explain(token_loss)(net, ids, None, ids)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_task_uses_uncompiled_plain_path_without_compile():
    task = CausalLM(model=zoo.model_config("gpt", **TINY).to_dict(), compile=False)
    assert task.compiled("token_loss", token_loss) is token_loss and task.runner is task.net


def test_compiled_wrappers_stay_out_of_the_state_dict():
    task = CausalLM(model=zoo.model_config("gpt", **TINY).to_dict(), compile=True)
    keys = set(task.state_dict())
    task.runner, task.compiled("token_loss", token_loss)
    assert set(task.state_dict()) == keys and all(k.startswith("net.") for k in keys)
    fresh = CausalLM(model=zoo.model_config("gpt", **TINY).to_dict(), compile=True)
    fresh.load_state_dict(task.state_dict())  # strict: a compiled run's checkpoint resumes


def test_compile_mode_reaches_torch_compile_and_a_bad_one_is_refused(monkeypatch):
    """task.compile_mode: the mode torch.compile is given (default: none, torch's own); an unknown one is refused
    when the task is built, naming the choices (train.py checks it before anything else)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: seen.append(mode) or fn)
    cfg = zoo.model_config("gpt", **TINY).to_dict()
    CausalLM(model=cfg, compile=True).runner
    CausalLM(model=cfg, compile=True, compile_mode="max-autotune-no-cudagraphs").runner
    assert seen == [None, "max-autotune-no-cudagraphs"]
    with pytest.raises(ValueError, match="task.compile_mode='reduce-overhead': choose one of default, max-autotune"):
        CausalLM(model=cfg, compile=True, compile_mode="reduce-overhead")


def test_nonfinite_loss_raises_on_cpu():
    task = CausalLM(model=zoo.model_config("gpt", **TINY).to_dict())
    task.check_finite(torch.tensor(1.5))
    with pytest.raises(NonFiniteLossError, match="nan"):
        task.check_finite(torch.tensor(float("nan")))


class _Batches(pl.LightningDataModule):
    seq_len = 16

    def train_dataloader(self):
        x = torch.randint(0, 64, (8, 2, 17))
        batches = [{"input_ids": b[:, :-1].contiguous(), "labels": b[:, 1:].contiguous()} for b in x]
        return torch.utils.data.DataLoader(batches, batch_size=None)


class _FusedCausalLM(CausalLM):
    """fused AdamW as on CUDA (torch also has it on the CPU): Lightning's bf16-mixed plugin refused to clip."""

    def configure_optimizers(self):
        out = super().configure_optimizers()
        opt = out["optimizer"]
        fused = torch.optim.AdamW(opt.param_groups, lr=opt.defaults["lr"], fused=True)
        out["lr_scheduler"]["scheduler"].optimizer = fused
        return {"optimizer": fused, "lr_scheduler": out["lr_scheduler"]}


def test_bf16_mixed_clips_gradients_with_fused_adamw(tmp_path):
    norms = []

    class Task(_FusedCausalLM):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    task = Task(model=zoo.model_config("gpt", **TINY).to_dict())
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=3, gradient_clip_val=1e-3,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=_Batches())
    assert trainer.global_step == 3 and task._host_loss is not None
    assert len(norms) == 3 and all(n <= 1.001e-3 for n in norms), norms


@pytest.mark.gpu
def test_sdpa_matches_reference_on_gpu_in_the_model_layout():
    """SDPA as the model calls it (cuDNN on Hopper under torch 2.11) against the float64 reference."""
    torch.manual_seed(0)
    b, h, n, d = 2, 12, 300, 64  # a length that is not a multiple of any tile
    for causal in (True, False):
        # the layout the model produces: one fused qkv projection, split, viewed and transposed
        qkv = torch.randn(b, n, 3 * h * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in qkv.split(h * d, dim=-1))
        out = kernels.attention(q, k, v, causal=causal, backend="sdpa")
        g = torch.randn_like(out)
        (gq,) = torch.autograd.grad(out, qkv, g)
        qkv64 = qkv.detach().double().requires_grad_()
        q64, k64, v64 = (t.view(b, n, h, d).transpose(1, 2) for t in qkv64.split(h * d, dim=-1))
        ref = kernels.attention_reference(q64, k64, v64, causal=causal)
        (gref,) = torch.autograd.grad(ref, qkv64, g.double())
        rel = (out.double() - ref).norm() / ref.norm()
        grel = (gq.double() - gref).norm() / gref.norm()
        assert rel < 1e-2 and grel < 2e-2, (causal, float(rel), float(grel))


@pytest.mark.gpu
def test_async_nonfinite_check_on_gpu():
    task = CausalLM(model=zoo.model_config("gpt", **TINY).to_dict()).cuda()
    good, bad = torch.tensor(2.0, device="cuda"), torch.tensor(float("inf"), device="cuda")  # (blocking copies)
    task.check_finite(good)
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work queued ahead: the next loss cannot have landed yet
    task.check_finite(bad)  # no sync: its copy is queued behind the sleep, not yet read
    assert task._pending_losses  # the inf is still in flight
    with pytest.raises(NonFiniteLossError, match="inf"):
        task.on_save_checkpoint({})  # a checkpoint waits for every pending loss
    assert task._host_loss == float("inf") and not task._pending_losses
