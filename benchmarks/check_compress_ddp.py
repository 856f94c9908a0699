"""The data-parallel calibration path (issue 9): `torchrun --nproc_per_node 2 -m weightsmith compress
--device cuda` (NCCL; `cpu`: gloo) against one process with the same windows, batched the same way, on a
random 2-block Llama with a tokenizer trained on TEXT (a UTF-8 file; default: the packaged Hamlet). Usage:
    python benchmarks/check_compress_ddp.py [cpu|cuda] [TEXT]
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compress import random_llama  # noqa: E402

from weightsmith.compress import GPTQ, calibration_batches, compress, load_compressed  # noqa: E402
from weightsmith.models import load_model  # noqa: E402

torch.set_num_threads(1)
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
if len(sys.argv) > 2:
    text_file = Path(sys.argv[2])
else:
    from weightsmith import assets

    text_file = Path(tempfile.mkdtemp()) / "hamlet.txt"
    text_file.write_text(assets.load_text("hamlet"))
work = Path(tempfile.mkdtemp())
model, tok = random_llama("tiny", text_file.read_text())
model.config.architectures = ["LlamaForCausalLM"]
model.save_pretrained(work / "tiny")
tok.save_pretrained(work / "tiny")
env = {**os.environ, "OMP_NUM_THREADS": "1", "WEIGHTSMITH_PROGRESS": "0"}
args = f"--method gptq --bits 4 --group-size 16 --samples 8 --seq-len 32 --device {dev} --calib {text_file}"
run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
cmd = [*run, "weightsmith", "compress", str(work / "tiny"), *args.split(), "--out", str(work / "q")]
r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
print("torchrun rc", r.returncode, r.stdout[-800:], r.stderr[-2500:] if r.returncode else "")
got = load_compressed(work / "q").state_dict()
net, tok2 = load_model(work / "tiny")

calib = calibration_batches(tok2, str(text_file), 8, 32, batch_size=4)
compress(net, GPTQ(bits=4, group_size=16), calib=calib, device=torch.device(dev))
ref = {k: v.detach().cpu() for k, v in net.state_dict().items()}
worst = max(
    ((got[k].float() - ref[k].float()).abs().max().item() / max(ref[k].float().abs().max().item(), 1e-12), k)
    for k in ref
    if k.endswith("proj.weight")
)
print(f"two processes vs one ({dev}): worst relative max difference {worst[0]:.3e} at {worst[1]}")
