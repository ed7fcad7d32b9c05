"""Choice of the MbLS/CALS path (the torch function on CPU, the fused Triton kernel on CUDA), its
fallback, the interpreted kernel tests in a fresh process, and the kernel on a GPU when there is one."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segcalib.losses import _margin_ce
from segcalib.losses._penalties import PENALTIES, Margin
from tests.losses._helpers import make_loss, random_batch

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_logits_take_the_torch_path() -> None:
    logits, _ = random_batch((1, 3, 4, 4))
    for penalty in (Margin(), *PENALTIES.values()):
        assert _margin_ce.fused_backend(logits, penalty) == "torch"
        assert _margin_ce.fused_backend(logits.bfloat16(), penalty) == "torch"


def test_failing_kernel_falls_back_to_torch_path(monkeypatch) -> None:
    from segcalib.losses import _margin_ce_triton

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel here")

    logits, target = random_batch((2, 3, 5, 4), seed=1)
    expected = make_loss("mbls", margin=1.0)(logits, target)
    monkeypatch.setattr(_margin_ce, "_TRITON_FAILED", [])
    monkeypatch.setattr(_margin_ce_triton, "fused_margin_cross_entropy", broken)
    monkeypatch.setattr(_margin_ce, "fused_backend", lambda logits, penalty: "torch" if _margin_ce._TRITON_FAILED else "triton")
    with pytest.warns(UserWarning, match="fused Triton MbLS/CALS kernel failed.*no kernel here"):
        value = make_loss("mbls", margin=1.0)(logits, target)
    assert value.item() == expected.item()
    assert _margin_ce._TRITON_FAILED  # no second try in this process
    make_loss("mbls", margin=1.0)(logits, target)


def test_out_of_memory_in_the_kernel_is_raised_not_hidden(monkeypatch) -> None:
    from segcalib.losses import _margin_ce_triton

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    logits, target = random_batch((1, 3, 4, 4), seed=2)
    monkeypatch.setattr(_margin_ce, "_TRITON_FAILED", [])
    monkeypatch.setattr(_margin_ce_triton, "fused_margin_cross_entropy", out_of_memory)
    monkeypatch.setattr(_margin_ce, "fused_backend", lambda logits, penalty: "triton")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        make_loss("cals", 3)(logits, target)
    assert not _margin_ce._TRITON_FAILED


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreted")
def test_kernel_interpreted_on_cpu() -> None:
    # Triton reads TRITON_INTERPRET when it is first imported, so the kernel's tests run in a fresh process
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    script = Path(__file__).with_name("margin_triton_interpreted.py")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"\b17 passed\b", run.stdout) and "skipped" not in run.stdout, run.stdout[-2000:]


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("dtype, penalty, classes, write_grad", [("bf16", 1, 4, True), ("fp32", 0, 4, False), ("fp16", 2, 14, True)])
def test_kernel_compiles_for_sm90_without_a_gpu(dtype, penalty, classes, write_grad) -> None:
    # the interpreter does not lower the kernel; compiling it for an H100/H200 target (ptxas ships
    # with Triton) does, so a kernel that would fail to build on the GPU fails here
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from segcalib.losses import _margin_ce_triton as fused

    strides = ("stride_zb", "stride_zc", "stride_zn", "stride_tb", "stride_tn", "stride_gb", "stride_gc", "stride_gn")
    signature = {"logits": f"*{dtype}", "target": "*i64", "lam_ptr": "*fp32", "rho_ptr": "*fp32", "count_ptr": "*fp32",
                 "grad": f"*{dtype}", "partials": "*fp32", "n_vox": "i32", "n_blocks": "i32", "ignore_index": "i32",
                 "margin": "fp32", "scale": "fp32", "pen_weight": "fp32", **dict.fromkeys(strides, "i64")}
    constants = {"N_CLASSES": classes, "BLOCK_C": triton.next_power_of_2(classes), "PENALTY": penalty,
                 "WRITE_GRAD": write_grad, "OUT_BF16": dtype == "bf16", "BLOCK_N": fused._block_voxels(classes)}
    signature.update(dict.fromkeys(constants, "constexpr"))
    source = ASTSource(fn=triton.jit(fused._margin_ce_kernel), signature=signature,
                       constexprs={(list(signature).index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"] and ".local" not in ptx  # built by ptxas, no register spills
    assert ("st.global" in ptx) and (ptx.count("st.global") > 2) == write_grad  # the gradient store only when asked


@needs_cuda
@pytest.mark.parametrize("name, params", [("mbls", {}), ("cals", {"penalty": "phr"}), ("cals", {"penalty": "p3"})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_equals_cpu_torch_path(name, params, dtype) -> None:
    logits, target = random_batch((2, 4, 16, 12, 10), scale=6.0, seed=9)
    logits = logits.to(dtype)
    target[0, :3] = -100
    results = []
    for device in ("cpu", "cuda"):
        z = logits.to(device).detach().requires_grad_(True)  # a fresh leaf per device (.to("cpu") is logits itself)
        loss_fn = make_loss(name, 4, **params).to(device)
        loss = loss_fn(z, target.to(device))
        loss.backward()
        results.append((loss.detach().cpu(), loss_fn.last_components["penalty"].cpu(), z.grad.float().cpu()))
    assert _margin_ce.fused_backend(logits.cuda(), Margin()) == ("triton" if HAS_TRITON else "torch")
    cpu, gpu = results
    torch.testing.assert_close(gpu[0], cpu[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu[1], cpu[1], rtol=1e-5, atol=1e-6)
    step = 2**-7 if dtype == torch.bfloat16 else 1e-5  # bf16: one rounding apart at most
    torch.testing.assert_close(gpu[2], cpu[2], rtol=step, atol=step * cpu[2].abs().max().item())
