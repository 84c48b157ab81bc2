"""The README's memory table: `common.memory_estimate` for Qwen2.5-0.5B / 1.5B / 3B at the released settings.

    python benchmarks/memory_estimate.py

Released settings (the README's one-GPU command): bf16 weights, G = 4, 256 prompts a step, 1024 new tokens,
micro-batches of 16 rows, a KL reference. Prompt lengths are assumptions (countdown with the Qwen chat
template: about 150 question tokens; a full hint at most about 100).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

QUESTION, HINT, NEW = 150, 100, 1024      # tokens: prompt, longest hint, --max_completion_length
PROMPTS, G = 256, 4                       # --batch_size, --num_generations


def estimate(shape, micro_rows: int, checkpointing: bool, gpus: int = 1, weight_bytes: int = 2) -> dict:
    return common.memory_estimate(shape, weight_bytes=weight_bytes, activation_bytes=2,
                                  rows_per_pass=micro_rows, tokens_per_row=QUESTION + HINT + NEW,
                                  scored_per_row=HINT + NEW,
                                  rollout_rows=PROMPTS // gpus * G, rollout_tokens=QUESTION + HINT + NEW,
                                  reference=True, gradient_checkpointing=checkpointing)


def model_state(terms: dict) -> int:
    return terms["weights"] + terms["gradients"] + terms["optimizer"] + terms["reference"]


def main() -> None:
    gb = lambda n: f"{n / 1e9:.1f}"  # noqa: E731
    print("| GB, one device | weights + gradients + AdamW + reference: `--dtype bfloat16` "
          "| the same, `--dtype float32 --bf16` | activations, micro-batch 16 rows "
          "| 16 rows, `--gradient_checkpointing` | 2 rows, `--gradient_checkpointing` "
          "| rollout KV cache, 1 GPU (1,024 rows) | rollout KV cache, each of 4 GPUs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shape in common.QWEN25.items():
        full, ckpt, small = estimate(shape, 16, False), estimate(shape, 16, True), estimate(shape, 2, True)
        fp32 = estimate(shape, 2, True, weight_bytes=4)
        print(f"| {name} ({shape.params / 1e9:.2f}B) | {gb(model_state(full))} | {gb(model_state(fp32))} "
              f"| {gb(full['activations'])} | {gb(ckpt['activations'])} | {gb(small['activations'])} "
              f"| {gb(full['kv_cache'])} | {gb(estimate(shape, 2, True, gpus=4)['kv_cache'])} |")


if __name__ == "__main__":
    main()
