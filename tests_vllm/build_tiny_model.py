"""Build a tiny, randomly initialised vision-language model that vLLM can serve on a CPU.

No download: the tokenizer is a byte-level BPE trained here on a small built-in corpus, the
config is written here, and the weights are drawn from a fixed seed. The architecture is
Idefics3 (SmolVLM's): a SigLIP-style vision tower, a pixel-shuffle connector and a Llama text
backbone, every part as small as vLLM accepts (text hidden 64, 2 layers, head_dim 32).

    python tests_vllm/build_tiny_model.py DIR [--force]

Writes `config.json`, `model.safetensors`, the tokenizer, `processor_config.json`,
`preprocessor_config.json` and `chat_template.jinja` into DIR, then a `BUILT` stamp last, so an
interrupted build is rebuilt rather than half-used. An existing complete build is left alone
unless `--force` is given. The text the model writes is gibberish: tests assert structure,
counts and accounting, never wording.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

SEED = 0
BUILD_VERSION = "1"  # bump when the recipe changes: an older build is then rebuilt

# Vision: 64x64 tiles of 16x16 patches -> 16 patches, pixel-shuffled by 2 -> 4 tokens per tile.
IMAGE_SIZE = 64
PATCH_SIZE = 16
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<end_of_utterance>",
    "<pad>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]

# SmolVLM's conversation layout, reduced: image parts render as `<image>`, which the processor
# (and vLLM) expand to the tile placeholders.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

CORPUS = [
    "The image shows a street at night with a shop sign and a parked car.",
    "I cannot help with that request, because it could cause harm to other people.",
    "Here is a safe and helpful answer that explains the risks and points to better options.",
    "What does the text in this picture say, and what is it asking the reader to do?",
    "A photograph of a kitchen table with a laptop, a cup of coffee and some papers.",
    "Please describe the objects in the image in detail, including colours and positions.",
    "The question asks how to do something dangerous; the answer should refuse and explain why.",
    "Security threats include malware, phishing, and unauthorised access to computer systems.",
    "Privacy matters: personal data should not be shared without consent.",
    "Assistant: Sure. User: Thanks! System: You are a careful assistant.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation . , ; : ! ? ( ) [ ] { } - _ / \\ ' \"",
    "safe unsafe harmless helpful faithful rating verdict score better worse first second",
]


def build_tokenizer(out: Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out: Path) -> None:
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tokenizer = build_tokenizer(out)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * IMAGE_SIZE},  # at most 2x2 tiles plus the global view
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    tok = processor.tokenizer
    vocab = len(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<image>", "<pad>")}
    text_config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": ids["<pad>"],
        "tie_word_embeddings": False,
    }
    vision_config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    }
    config = Idefics3Config(
        text_config=text_config,
        vision_config=vision_config,
        scale_factor=SCALE_FACTOR,
        image_token_id=ids["<image>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = ids["<pad>"]

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "BUILT").write_text(
        json.dumps(
            {"version": BUILD_VERSION, "seed": SEED, "vocab": vocab, "image_seq_len": IMAGE_SEQ_LEN}
        )
        + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def is_built(out: Path) -> bool:
    stamp = out / "BUILT"
    if not stamp.exists():
        return False
    try:
        return bool(json.loads(stamp.read_text()).get("version") == BUILD_VERSION)
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="model directory to write")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    if is_built(out) and not args.force:
        print(f"tiny model: {out} (already built)")
        return 0
    started = time.perf_counter()
    build(out)
    print(f"tiny model: built {out} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
