"""Host memory of loading a pretrained model under a 2-process launch, with ``train.rank0_loading`` on
(the default: only rank 0 reads the weights, the others build on the meta device) and off (every
process reads them).

A Llama language model (``--hidden`` wide, ``--layers`` deep, 32k vocabulary: 271M parameters at the
defaults) is saved in bf16, as hub checkpoints are, and a small ViT in fp32, as transformers folders; ``vlmkit train`` then runs
one connector step on them under ``torchrun --nproc-per-node 2`` (gloo, CPU) for each setting and
strategy. Every process records its peak resident memory (``ru_maxrss``) before and after building the
run's first model; the growth is what the build held in host memory. On GPU machines that growth is
the host copy each process makes before moving the model to its device (8 copies of a 7B model in fp32
on an 8-GPU node is 224 GB). A checkpoint read in its stored dtype is memory-mapped by transformers, and
processes reading one file share its pages; a conversion (bf16 to fp32 here, as the LLaVA recipes train)
or a random initialisation gives every process a private copy, which is what rank 0 loading saves; on this CPU run a process that built without weights allocates the model
later, when the strategy wraps it, so its peak over the whole run is not lower: the figure is the build.

    python bench/rank0_loading.py [--hidden 1024 --layers 16] [--strategies ddp,fsdp]

The last lines give, per strategy, rank 1's build growth as a fraction of rank 0's with the option on,
and rank 0's and rank 1's with it off.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def child(record: str, argv: list[str]) -> int:
    """Under torchrun: ``vlmkit`` with ``argv``, recording this rank's peak RSS around the first build."""
    import vlmkit.training.run as run
    from vlmkit import distributed
    from vlmkit.cli import main

    seen: dict = {}
    original = run.first_model

    def first_model(*args, **kwargs):
        seen["before_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        built = original(*args, **kwargs)
        seen["after_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return built

    run.first_model = first_model
    code = main(argv)
    seen["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(f"{record}.rank{distributed.rank()}").write_text(json.dumps(seen))
    return code


def save_models(root: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    import torch
    import transformers

    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False))
    lm.to(torch.bfloat16).save_pretrained(root / "llama")  # as hub checkpoints are stored; the run trains fp32
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                       image_size=32, patch_size=8))
    vit.save_pretrained(root / "vit")
    size = sum(p.numel() for p in lm.parameters())
    print(f"language model: {size / 1e6:.0f}M parameters, saved in bf16 ({size * 2 / 2**20:.0f} MB), "
          f"loaded in fp32 ({size * 4 / 2**20:.0f} MB)", flush=True)
    return root / "llama", root / "vit"


def write_recipe(root: Path, llama: Path, vit: Path) -> Path:
    import yaml
    from PIL import Image

    (root / "img").mkdir()
    rows = []
    for i, (name, rgb) in enumerate({"red": (210, 30, 30), "blue": (30, 30, 210)}.items()):
        Image.new("RGB", (32, 32), rgb).save(root / "img" / f"{name}.png")
        rows.append({"id": str(i), "image": f"img/{name}.png",
                     "conversations": [{"from": "human", "value": "<image>\nwhat color?"}, {"from": "gpt", "value": name}]})
    (root / "data.json").write_text(json.dumps(rows))
    recipe = {
        "name": "rank0-loading",
        "model": {"vision": {"encoder": "vit", "pretrained": str(vit), "image_size": 32, "feature_layer": -2},
                  "connector": {"type": "mlp2x_gelu"},
                  "language": {"backbone": "llama", "pretrained": str(llama), "tokenizer": {"train_vocab_size": 300}},
                  "template": "chatml", "max_length": 64},
        "stages": [{"name": "align", "policy": {"connector": "full"}, "data": {"source": "llava_json", "path": str(root / "data.json")},
                    "batch_size": 2, "max_steps": 1, "lr": 1e-3}],
        "train": {"progress": False, "threads": 1},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--strategies", default="ddp,fsdp")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rank0-loading-"))
    llama, vit = save_models(root, args.hidden, args.layers)
    recipe = write_recipe(root, llama, vit)
    results = {}
    for strategy in args.strategies.split(","):
        for setting in ("true", "false"):
            record = root / f"{strategy}-{setting}"
            argv = ["train", str(recipe), f"train.output_dir={root / ('run-' + record.name)}", "--no-eval",
                    f"train.strategy={strategy}", f"train.rank0_loading={setting}"]
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                                   "--master-port", str(29500 + len(results)), __file__, "--child", str(record), "--", *argv],
                                  capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode:
                sys.exit(f"{strategy} rank0_loading={setting} failed:\n{done.stderr[-3000:]}")
            ranks = [json.loads(Path(f"{record}.rank{r}").read_text()) for r in range(2)]
            results[(strategy, setting)] = [r["after_mb"] - r["before_mb"] for r in ranks]
            print(f"{strategy:5s} rank0_loading={setting:5s}  build growth rank 0 / rank 1: "
                  f"{results[(strategy, setting)][0]:7.0f} / {results[(strategy, setting)][1]:7.0f} MB;  "
                  f"peak over the run: {ranks[0]['peak_mb']:.0f} / {ranks[1]['peak_mb']:.0f} MB", flush=True)
    for strategy in args.strategies.split(","):
        on, off = results[(strategy, "true")], results[(strategy, "false")]
        print(f"{strategy}: rank 1's build with rank0_loading = {on[1] / on[0]:.3f} of rank 0's; without: {off[1] / off[0]:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        split = sys.argv.index("--")
        sys.exit(child(sys.argv[2], sys.argv[split + 1 :]))
    main()
