"""The conversation format that stages 3-5 and `selfalign chat` speak, read from
`principles/engrave_template.yaml`.

A short system overview (the assistant's name and who made it; no principles, no exemplars), then
`### User` / `### <Name>` turns. The answer is followed by the next `### User` marker, learned as
the end of an answer and used as the stop string at inference. Stage 4's verbose instruction
(`principles/verbose_prompt.yaml`) goes into the system part when given.

`ChatFormat.chat_template` writes the same format as a Jinja chat template, saved with every
adapter so that transformers' `apply_chat_template` (and TRL) render exactly what we train on.

This module only builds text; it does not tokenize, mask losses or train (`selfalign.training`
does), so evaluation and the CLI use it without the training code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .inputs import PRINCIPLES_DIR, check_templates, read_yaml


@dataclass(frozen=True)
class ChatFormat:
    assistant: str
    developer: str
    overview: str
    conversation_heading: str
    user_turn: str
    assistant_turn: str
    end_of_answer: str

    @classmethod
    def load(cls, path: str | Path = PRINCIPLES_DIR / "engrave_template.yaml") -> "ChatFormat":
        data = read_yaml(path, ValueError)
        check_templates(path, data, {"overview": [], "conversation_heading": [], "user_turn": ["{text}"],
                                     "assistant_turn": ["{assistant}", "{text}"], "end_of_answer": [],
                                     "assistant": [], "developer": []}, ValueError)
        if not data["end_of_answer"].strip():
            raise ValueError(f"{path}: end_of_answer must not be blank (generation stops on it)")
        chat = cls(**{k: data[k] for k in cls.__dataclass_fields__})
        try:  # once here, so that an unknown {field} fails before a model is loaded, naming the file
            chat.prompt("question", (("earlier", "answer"),), "instruction")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"{path}: a template cannot be filled in ({type(error).__name__}: {error}); its fields "
                             "are {assistant}, {developer} and {text}, and a literal brace is written twice") from None
        return chat

    @property
    def stop(self) -> str:
        return self.end_of_answer

    def system(self, instruction: str = "") -> str:
        """The overview, with an extra instruction (stage 4's verbose one) if given."""
        parts = [self.overview, instruction, self.conversation_heading]
        return "\n\n".join(p.strip() for p in parts if p.strip()).format(assistant=self.assistant,
                                                                         developer=self.developer)

    def prompt(self, user: str, history: tuple[tuple[str, str], ...] = (), instruction: str = "") -> str:
        """The text the model continues with its answer: system, earlier turns, this user turn."""
        turns = [self.system(instruction)]
        for question, answer in history:
            turns += [self.user_turn.format(text=question.strip()), self._assistant(answer.strip())]
        turns += [self.user_turn.format(text=user.strip()), self._assistant("")]
        return "\n\n".join(turns)

    def target(self, answer: str) -> str:
        """What the model learns to write after `prompt`: the answer, then the next turn's marker."""
        return f"{answer.strip()}\n\n{self.end_of_answer}"

    def _assistant(self, text: str) -> str:
        return self.assistant_turn.format(assistant=self.assistant, text=text)

    def chat_template(self, instruction: str = "", prefix: str = "") -> str:
        """This format as a Jinja chat template for transformers' `apply_chat_template`.

        Messages alternate user, assistant, ... after an optional leading system message, which takes
        the place of `instruction` (it goes where stage 4's instruction goes, between the overview and
        the conversation heading; it is put in as written, not `.format`ted). With
        add_generation_prompt the text is `prefix + prompt(last user message, earlier pairs)`; a
        conversation ending with an assistant message ends with `target(answer)` instead, inside
        `{% generation %}`, so that the assistant mask (TRL's assistant_only_loss) covers what our
        loss covers. `prefix` is text before everything: a bos token that training puts in front.
        """
        marker = "\x00"  # never in a format string: ChatFormat.load reads YAML text
        user = self.user_turn.format(text=marker).split(marker)
        answer = self._assistant(marker).split(marker)
        end = "\n\n" + self.end_of_answer
        # When the next user turn opens with the end-of-answer marker (as in the default format), the
        # marker after an earlier answer joins that answer's generation block, as it does for the last.
        joined = answer[-1] == "" and user[0].startswith(self.end_of_answer)
        after_answer = [user[0][len(self.end_of_answer):], *user[1:]] if joined else ["\n\n" + user[0], *user[1:]]
        generation_prompt = "\n\n" + self._assistant("")

        def turn(pieces: list[str], answer_tail: str | None = None) -> str:
            # pieces joined by the message's text; an answer's text (answer_tail not None) goes
            # inside {% generation %}, its last occurrence followed there by answer_tail.
            out = []
            for number, piece in enumerate(pieces):
                if number and answer_tail is None:
                    out.append("{{- text -}}")
                elif number:
                    tail = " + " + _literal(answer_tail) if answer_tail and number == len(pieces) - 1 else ""
                    out.append("{%- generation -%}{{- text" + tail + " -}}{%- endgeneration -%}")
                if piece:
                    out.append("{{- " + _literal(piece) + " -}}")
            return "".join(out)

        fields = {"assistant": self.assistant, "developer": self.developer}
        overview = self.overview.strip().format(**fields)
        heading = self.conversation_heading.strip().format(**fields)
        default_instruction = instruction.strip().format(**fields) if instruction.strip() else ""
        lines = [
            "{#- The conversation format of selfalign (selfalign/chat_format.py), as ChatFormat renders it. -#}",
            "{%- set start = 1 if messages and messages[0]['role'] == 'system' else 0 -%}",
            "{%- if start and messages[0]['content'] is not string -%}"
            "{{- raise_exception('the system message must be text') -}}{%- endif -%}",
            "{%- set instruction = (messages[0]['content'] | trim) if start else " + _literal(default_instruction)
            + " -%}",
            "{{- " + _literal(prefix + overview) + " -}}",
            "{%- if instruction -%}{{- " + _literal("\n\n" if overview else "") + " + instruction -}}{%- endif -%}",
        ]
        if heading:
            separator = _literal("\n\n") if overview else "('\\n\\n' if instruction else '')"
            lines.append("{{- " + separator + " + " + _literal(heading) + " -}}")
        lines += [
            "{%- for message in messages[start:] -%}",
            "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
            "{{- raise_exception('after an optional system message, messages must alternate user, assistant, "
            "user, ...; message ' ~ (loop.index0 + start) ~ ' is ' ~ message['role']) -}}{%- endif -%}",
            "{%- if message['content'] is not string -%}"
            "{{- raise_exception('message ' ~ (loop.index0 + start) ~ ': content must be text') -}}{%- endif -%}",
            "{%- set text = message['content'] | trim -%}",
            "{%- if message['role'] == 'user' and not loop.first -%}" + turn(after_answer),
            "{%- elif message['role'] == 'user' -%}" + turn(["\n\n" + user[0], *user[1:]]),
            "{%- elif loop.last -%}" + turn([generation_prompt, ""], end),
            "{%- else -%}" + turn(["\n\n" + answer[0], *answer[1:]], end if joined else ""),
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}",
            "{%- if (messages[start:] | length) % 2 == 0 -%}"
            "{{- raise_exception('add_generation_prompt needs a conversation that ends with a user message') -}}"
            "{%- endif -%}",
            "{{- " + _literal(generation_prompt) + " -}}",
            "{%- endif -%}",
        ]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return asdict(self)


def _literal(text: str) -> str:
    # A JSON string is a Jinja string literal with the same escapes; non-ASCII stays as it is, which
    # Jinja reads back exactly (ensure_ascii would split an emoji into two surrogate escapes).
    return json.dumps(text, ensure_ascii=False)


def read_instruction(path: str | Path = PRINCIPLES_DIR / "verbose_prompt.yaml") -> str:
    data = read_yaml(path, ValueError)
    if not isinstance(data.get("instruction"), str) or not data["instruction"].strip():
        raise ValueError(f"{path}: 'instruction' is missing or empty")
    return data["instruction"]
