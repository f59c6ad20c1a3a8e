"""Checks `tora export --format trl` output with TRL itself. Run as a script in
its own process (torch and llama.cpp must not share one):

    python trl_check.py ROWS.jsonl WORKDIR

Loads the rows with `datasets`, checks each with TRL's conversational-format
helpers, renders each through a tool-calling chat template (Qwen2.5's, as
shipped with TRL) with `tools`, and trains one SFT step of a tiny random
Llama on them. Prints one JSON line with what it counted.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path


def tokenizer(template: str) -> object:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # Byte-level BPE with no merges: every byte is a token, so any text round-trips.
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<|endoftext|>", "<|im_end|>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = template
    return fast


def main(rows_path: Path, work: Path) -> None:
    import datasets
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import _validate_tool_calls
    from trl.data_utils import is_conversational

    ds = datasets.load_dataset("json", data_files=str(rows_path), split="train")
    template = resources.files("trl").joinpath("chat_templates/qwen2_5.jinja").read_text()
    tok = tokenizer(template)
    responses = 0
    for row in ds:
        assert is_conversational(row), row
        assert row["tools"] and row["tools"][0]["function"]["name"] == "python"
        for m in row["messages"]:
            assert m["role"] in ("user", "assistant", "tool")
            if m["role"] == "assistant" and m.get("tool_calls"):
                _validate_tool_calls(m["tool_calls"])
        text = tok.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)  # type: ignore[attr-defined]
        assert '"name": "python"' in text and "<tools>" in text, "the tool schema is rendered"
        for m in row["messages"]:
            if m["role"] == "tool":
                assert f"<tool_response>\n{m['content']}\n</tool_response>" in text
                responses += 1
            elif m["role"] == "assistant" and m.get("tool_calls"):
                for call in m["tool_calls"]:
                    assert json.dumps(call["function"]["arguments"], ensure_ascii=False) in text, "the call's code is rendered"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,  # type: ignore[arg-type]
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=8192, eos_token_id=tok.eos_token_id,  # type: ignore[attr-defined]
                                      pad_token_id=tok.pad_token_id)  # type: ignore[attr-defined]
    model = transformers.LlamaForCausalLM(config)
    args = SFTConfig(output_dir=str(work), max_steps=1, per_device_train_batch_size=2, report_to=[], max_length=8192,
                     save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    result = trainer.train()
    print(json.dumps({"rows": len(ds), "tool_responses": responses, "trained_steps": result.global_step,
                      "loss": result.training_loss}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
