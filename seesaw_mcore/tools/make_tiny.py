"""Builds tiny Llama-architecture HF checkpoints locally (nothing is downloaded).

- ``build_random(path, ...)``: random weights, for tests and benchmarks
  (``bench/models.py``).
- ``build_trained(path, seconds)``: a BPE tokenizer and a small model briefly trained on
  English docstrings from Python's standard library, so greedy output is not noise. This is
  the bundled demo model (``models/tiny-llama``).

Usage: ``python -m seesaw_mcore.tools.make_tiny --out models/tiny-llama --seconds 240``
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import sys
import sysconfig
import time

import torch

# The demo model only ever saw docstrings: its "chat" template is the messages as paragraphs,
# which it continues like documentation. Real chat models ship their own template.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if not loop.last %}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}\n\n{% endif %}"
)


def _docstring_corpus(limit_chars: int = 3_000_000) -> list[str]:
    """English paragraphs from the standard library's docstrings (always on disk)."""
    root = sysconfig.get_paths()["stdlib"]
    texts: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 80 and sum(c.isalpha() for c in doc) > 0.7 * len(doc):
                        para = " ".join(doc.split())
                        texts.append(para)
                        total += len(para)
            if total > limit_chars:
                return texts
    return texts


def _train_tokenizer(texts: list[str], vocab: int, path: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_trained(path: str, seconds: float = 240.0, seed: int = 0) -> str:
    """Trains the bundled demo model for about ``seconds`` on one CPU thread."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    random.seed(seed)
    os.makedirs(path, exist_ok=True)
    texts = _docstring_corpus()
    tok = _train_tokenizer(texts, 2048, path)
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t)["input_ids"] + [tok.eos_token_id])
    data = torch.tensor(ids, dtype=torch.long)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    seq, batch, step, start = 128, 24, 0, time.time()
    while time.time() - start < seconds:
        offs = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[o : o + seq + 1] for o in offs])  # [B, S+1]
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    print(f"saved {path}: {sum(p.numel() for p in model.parameters())/1e6:.2f}M params, "
          f"{step} steps, final loss {loss.item():.3f}")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/tiny-llama")
    ap.add_argument("--seconds", type=float, default=240.0, help="training time budget")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    build_trained(args.out, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
