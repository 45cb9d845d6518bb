"""`homeswarm chat`: a conversation with an instruct model through the swarm, in the terminal.

Each turn renders the whole history with the checkpoint's chat template (as ``homeswarm serve`` renders
``/v1/chat/completions``), streams the reply as it is generated, and keeps it in the history. ``/reset``
forgets the history (a ``--system`` message stays); ``/exit``, ``/quit`` or end of input ends the chat. A
turn that would not fit the model's context says so and is not kept.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from homeswarm.client.chat_template import ChatTemplate, ChatTemplateError
from homeswarm.client.tokenizer import TextCodec

HELP = "type a message; /reset forgets the conversation, /exit (or Ctrl-D) ends it"


@dataclass
class Conversation:
    """The history of one chat: what was said, and the prompt of the next turn. No I/O."""

    template: ChatTemplate
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def prompt(self, user_text: str) -> str:
        """The text that asks for the reply to ``user_text`` (ChatTemplateError if the template refuses)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.template.render([*system, *self.messages, {"role": "user", "content": user_text}])

    def add(self, user_text: str, reply: str) -> None:
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        self.messages.clear()


def read_lines(prompt: str = ">>> ") -> Iterator[str]:
    """The user's lines: with line editing at a terminal, plain lines from a pipe."""
    while True:
        if sys.stdin.isatty():
            try:
                yield input(prompt)
            except EOFError:
                sys.stdout.write("\n")
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
            yield line.rstrip("\n")


def run_chat(model: Any, codec: TextCodec, conversation: Conversation, lines: Iterable[str], *,
             context_length: int, max_new_tokens: int, say: Callable[[str], None],
             write: Callable[[str], None], **sampling: Any) -> int:
    """Answer every line of ``lines`` through ``model`` (an AutoDistributedModelForCausalLM); 0 at the end."""
    say(HELP)
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            conversation.reset()
            say("(the conversation is forgotten)")
            continue
        if text.startswith("/") and " " not in text:
            say(f"unknown command {text}: {HELP}")
            continue
        try:
            ids = codec.encode(conversation.prompt(line), add_special_tokens=False)  # the template wrote them
        except ChatTemplateError as e:
            say(f"error: {e}")
            continue
        room = min(max_new_tokens, context_length - len(ids))
        if room < 1:
            say(f"(this turn would not fit the model's context of {context_length} tokens: /reset starts over)")
            continue
        reply = _stream_reply(model, codec, ids, room, write, sampling)
        conversation.add(line, reply)
    return 0


def _stream_reply(model: Any, codec: TextCodec, ids: list[int], max_new_tokens: int,
                  write: Callable[[str], None], sampling: dict[str, Any]) -> str:
    new_ids: list[int] = []
    printed = ""
    for tokens in model.generate_stream([ids], max_new_tokens=max_new_tokens, **sampling):
        new_ids.append(int(tokens[0]))
        text = codec.decode(new_ids).rstrip("\ufffd")  # a character's bytes may span tokens: wait for the last
        if text.startswith(printed):
            write(text[len(printed):])
            printed = text
    text = codec.decode(new_ids)
    write(text[len(printed):] + "\n")
    return text.strip()
