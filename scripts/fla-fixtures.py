#!/usr/bin/env python3
"""Outside-reference fixtures: fla's linear-attention layers, run in f32 on a GPU, dumped as small
safetensors files that zoo's Rust tests load (crates/linear-attention/tests/fla_parity.rs).

For each case: an fla layer (flash-linear-attention 0.6.0, the layers of fla/layers/*.py with their
production kernels) built with a fixed seed, its parameters perturbed (norm gains and biases away
from their 1/0 inits, so a wrong name mapping cannot pass), an input x (B, T, D), the output y, and
for loss = sum(y * dy) the gradients of x and of every parameter. f32 throughout: TF32 off in torch
and TRITON_F32_DEFAULT=ieee so Triton's tl.dot runs full f32 matmuls.

Each fixture also records the zoo mixer config (TOML) that must reproduce the layer. Where zoo's
layer differs from fla's on purpose, that config selects fla's behaviour (RetNet: norm = "rms_norm"
instead of the paper's GroupNorm).

fla 0.6.0 refuses the chunked backward of its gated kernels (Simple GLA, Gated DeltaNet) on Hopper
with Triton < 3.7.1 (its issue #640), and the GPU machine has Triton 3.6 (a newer Triton wheel is too
big to carry). For those two layers the script swaps the chunked Triton op, inside fla's own layer,
for fla's own PyTorch reference of it (fla/ops/simple_gla/naive.py, fla/ops/gated_delta_rule/naive.py);
what the Gated DeltaNet kernel does in-kernel (q/k L2 norm, β = sigmoid, the gate
-exp(A_log)·softplus(a + dt_bias) via fla's `naive_gdn_gate`) runs in PyTorch before it. Everything
else (projections, short convolutions, norms, output gates) is fla's layer code unchanged, and the
index records which cases ran this way (`op`).

On the GPU machine (no network; fla and einops come as wheels carried in .devpkg/wheels):
  pip install --no-deps --target /tmp/pylib .devpkg/wheels/*.whl
  PYTHONPATH=/tmp/pylib python scripts/fla-fixtures.py --out crates/linear-attention/tests/fla
"""
import argparse
import json
import os

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
os.environ.setdefault("FLA_USE_COMPILE", "0")  # no torch.compile: nothing to wait for but Triton

import faulthandler  # noqa: E402
import sys  # noqa: E402

faulthandler.dump_traceback_later(30, repeat=True, file=sys.stderr)  # where it is, if it stalls

import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# fla's kernels autotune over many configs; compiling them all for f32 took over 7 minutes for the
# first layer alone. Numerics do not depend on the tile configuration, so every autotuner (fla
# wraps Triton's in its own cache layer) keeps only its first config and benchmarks nothing.
from triton.runtime import autotuner  # noqa: E402

_init = autotuner.Autotuner.__init__


def _first_config(self, fn, arg_names, configs=None, *a, **kw):
    if configs is None:
        kw["configs"] = list(kw["configs"])[:1]
        return _init(self, fn, arg_names, *a, **kw)
    return _init(self, fn, arg_names, list(configs)[:1], *a, **kw)


autotuner.Autotuner.__init__ = _first_config

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# T = 63: odd, and ≤ 64, where fla's layers in eval mode take their fused recurrent kernels (fewer
# kernels to compile; those that have only a chunked form use it).
D, B, T, H = 32, 2, 63, 2


def cases():
    from fla.layers import (BasedLinearAttention, DeltaNet, GatedDeltaNet, GatedLinearAttention,
                            LinearAttention, MultiScaleRetention)
    from fla.layers.simple_gla import SimpleGatedLinearAttention
    return [
        ("gla", lambda: GatedLinearAttention(hidden_size=D, num_heads=H),
         'type = "gla"\nn_heads = 2'),
        ("gla_conv_nogate", lambda: GatedLinearAttention(hidden_size=D, num_heads=H, use_short_conv=True,
                                                          conv_size=4, use_output_gate=False),
         'type = "gla"\nn_heads = 2\nshort_conv = 4\noutput_gate = "none"'),
        ("retnet", lambda: MultiScaleRetention(hidden_size=D, num_heads=H),
         'type = "retnet"\nn_heads = 2\nnorm = "rms_norm"'),
        ("simple_gla", lambda: SimpleGatedLinearAttention(hidden_size=D, num_heads=H),
         'type = "simple_gla"\nn_heads = 2\ndecay = "data_dependent"'),
        ("deltanet", lambda: DeltaNet(hidden_size=D, num_heads=H),
         'type = "deltanet"\nn_heads = 2'),
        ("gated_deltanet", lambda: GatedDeltaNet(hidden_size=D, num_heads=H, head_dim=D // H, expand_v=2),
         'type = "deltanet"\nn_heads = 2\ngated = true\nexpand_v = 2.0'),
        ("gated_deltanet_nogate", lambda: GatedDeltaNet(hidden_size=D, num_heads=H, head_dim=D // H, expand_v=1,
                                                        use_gate=False),
         'type = "deltanet"\nn_heads = 2\ngated = true\noutput_gate = "none"'),
        ("based", lambda: BasedLinearAttention(hidden_size=D, feature_dim=16, num_heads=H, num_key_value_heads=H),
         'type = "based"\nn_heads = 2\nfeature_dim = 16'),
        ("linear_attention", lambda: LinearAttention(hidden_size=D, num_heads=H, feature_map="elu",
                                                     output_norm="identity", do_feature_map_norm=True),
         'type = "linear_attention"\nn_heads = 2\nfeature_map = "elu1"'),
    ]


NAIVE_OP_CASES = {"simple_gla", "gated_deltanet", "gated_deltanet_nogate"}


def use_naive_ops():
    """Point fla's Simple GLA and Gated DeltaNet layers at fla's naive recurrent references."""
    import fla.layers.gated_deltanet as gd
    import fla.layers.simple_gla as sg
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    def simple_gla(q, k, v, g, initial_state=None, output_final_state=False, state_v_first=False,
                   cu_seqlens=None, scale=None):
        assert initial_state is None and cu_seqlens is None
        o, _ = naive_recurrent_simple_gla(q, k, v, g, scale=scale)
        return o, None

    def gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False,
                         use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                         allow_neg_eigval=False, state_v_first=False, cu_seqlens=None,
                         use_gate_in_kernel=False, A_log=None, dt_bias=None, scale=None):
        assert initial_state is None and cu_seqlens is None
        if use_qk_l2norm_in_kernel:  # fla's l2norm_fwd: x / sqrt(sum x^2 + 1e-6)
            q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
            k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        if use_beta_sigmoid_in_kernel:  # fla's fused_beta_sigmoid
            beta = beta.sigmoid() * (2.0 if allow_neg_eigval else 1.0)
        if use_gate_in_kernel:
            g = naive_gdn_gate(g, A_log, dt_bias)
        o, _ = naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=scale)
        return o, None

    sg.chunk_simple_gla = sg.fused_recurrent_simple_gla = simple_gla
    gd.chunk_gated_delta_rule = gd.fused_recurrent_gated_delta_rule = gated_delta_rule


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", help="comma-separated case names to run (default: all)")
    ap.add_argument("--tar", help="after each case, pack --out into this .tgz (partial results survive a kill)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import fla
    dev = torch.device("cuda")
    index = {}
    wanted = set(args.cases.split(",")) if args.cases else None
    use_naive_ops()
    for i, (name, build, zoo_cfg) in enumerate(cases()):
        if wanted is not None and name not in wanted:
            continue
        t0 = time.time()
        torch.manual_seed(1000 + i)
        print(f"{name}: building", flush=True)
        layer = build().to(dev, torch.float32).eval()
        with torch.no_grad():
            for pname, p in layer.named_parameters():
                if p.ndim == 1 and ("norm" in pname or pname.endswith("bias")) and "A_log" not in pname:
                    p.add_(0.3 * torch.randn_like(p))
        x = torch.randn(B, T, D, device=dev, requires_grad=True)
        out = layer(x)
        y = out[0] if isinstance(out, tuple) else out
        dy = torch.randn_like(y)
        (y * dy).sum().backward()
        t = {"x": x.detach(), "dy": dy, "y": y.detach(), "dx": x.grad}
        for pname, p in layer.named_parameters():
            t["w." + pname] = p.detach()
            t["g." + pname] = p.grad if p.grad is not None else torch.zeros_like(p)
        t = {k: v.float().contiguous().cpu() for k, v in t.items()}
        save_file(t, os.path.join(args.out, f"{name}.safetensors"))
        index[name] = {
            "fla_class": type(layer).__name__,
            "op": "fla naive (PyTorch)" if name in NAIVE_OP_CASES else "fla Triton",
            "zoo_config": zoo_cfg,
            "shape": [B, T, D],
            "params": {k: list(v.shape) for k, v in layer.state_dict().items()},
        }
        print(f"{name}: {type(layer).__name__} |y| = {y.norm():.4f} |dx| = {x.grad.norm():.4f} "
              f"({time.time() - t0:.1f} s)", flush=True)
        write_index(args, fla, index)


def write_index(args, fla, index):
    meta = {"fla_version": getattr(fla, "__version__", "?"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(), "cases": index}
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    if args.tar:
        subprocess.run(["tar", "czf", args.tar, "-C", args.out, "."], check=True)


if __name__ == "__main__":
    main()
