"""Tile-size sweep of the fused Triton CFConv (schnet_md.fused) on a water box, schnet2018, TF32 products: ms per
forward+backward for each BLOCK_PAIRS (issue #17). Usage (GPU machine): python3 benchmarks/gpu/fused_tiles.py"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import schnet_md.fused as fused_cfconv  # noqa: E402
from profile_cuda import time_calls  # noqa: E402
from schnet_md.bench import benchmark_model, water_box_arrays  # noqa: E402
from schnet_md.export import build_module  # noqa: E402

n_atoms = int(sys.argv[1]) if len(sys.argv) > 1 else 24000
z, positions, box = water_box_arrays(n_atoms)
model, label = benchmark_model("schnet2018", z, True)
plain, meta = build_module(model, z, periodic=True, box_nm=box, positions_nm=positions, check_errors=False,
                           script=False)
plain.model = fused_cfconv.FusedSchNet(plain.model)
plain = plain.cuda()
x = torch.as_tensor(positions, dtype=torch.float32, device="cuda").requires_grad_(True)
b = torch.as_tensor(box, dtype=torch.float32, device="cuda")
fused_cfconv.DOT_PRECISION = "tf32"
for block_pairs in (16, 32, 64, 128):
    fused_cfconv.BLOCK_PAIRS = block_pairs
    try:
        torch.autograd.grad(plain(x, b), x)
        torch.cuda.synchronize()
        print(f"{len(z)} atoms, schnet2018, fused CFConv tf32, BLOCK_PAIRS {block_pairs}: "
              f"{time_calls(plain, x, b, calls=5):.1f} ms per forward+backward", flush=True)
    except Exception as error:
        print(f"BLOCK_PAIRS {block_pairs}: failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
