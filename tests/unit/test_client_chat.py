"""`homeswarm chat`'s loop with a fake model: the history each turn sends, /reset, the context limit."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from homeswarm.client.chat import Conversation, run_chat
from homeswarm.client.chat_template import ChatTemplate
from homeswarm.client.tokenizer import TextCodec

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def byte_codec() -> TextCodec:
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return TextCodec(tokenizer)


class EchoModel:
    """Replies "ok" to every prompt, and remembers the prompts it was given."""

    def __init__(self, codec: TextCodec):
        self.codec, self.prompts, self.limits = codec, [], []

    def generate_stream(self, ids, *, max_new_tokens, **sampling):
        self.prompts.append(self.codec.decode(ids[0]))
        self.limits.append(max_new_tokens)
        for token in self.codec.encode("ok", add_special_tokens=False)[:max_new_tokens]:
            yield torch.tensor([token])


def chat(lines, *, context_length=4096, system=None):
    codec = byte_codec()
    model, said, written = EchoModel(codec), [], []
    code = run_chat(model, codec, Conversation(ChatTemplate(TEMPLATE), system=system), lines,
                    context_length=context_length, max_new_tokens=16, say=said.append, write=written.append)
    return code, model, said, "".join(written)


def test_each_turn_sends_the_history_and_keeps_the_reply():
    code, model, said, out = chat(["hi", "", "how are you?"], system="be brief")
    assert code == 0 and out == "ok\nok\n"
    assert model.prompts == [
        "<system>be brief\n<user>hi\n<assistant>",
        "<system>be brief\n<user>hi\n<assistant>ok\n<user>how are you?\n<assistant>",
    ]


def test_reset_forgets_all_but_the_system_message_and_exit_ends():
    _, model, said, _ = chat(["hi", "/reset", "again", "/exit", "never sent"], system="be brief")
    assert model.prompts[1] == "<system>be brief\n<user>again\n<assistant>"
    assert len(model.prompts) == 2 and "(the conversation is forgotten)" in said


def test_unknown_commands_and_turns_beyond_the_context_are_not_sent():
    _, model, said, _ = chat(["/help", "x" * 100, "y"], context_length=30)
    assert any(s.startswith("unknown command /help") for s in said)
    assert any("would not fit the model's context of 30 tokens" in s for s in said)
    assert model.prompts == ["<user>y\n<assistant>"] and model.limits == [30 - len("<user>y\n<assistant>")]
