"""The conversation format that stages 3-5 and `selfalign chat` speak, read from
`principles/engrave_template.yaml`.

A short system overview (the assistant's name and who made it; no principles, no exemplars), then
`### User` / `### <Name>` turns. The answer is followed by the next `### User` marker, learned as
the end of an answer and used as the stop string at inference. Stage 4's verbose instruction
(`principles/verbose_prompt.yaml`) goes into the system part when given.

This module only builds text; it does not tokenize, mask losses or train (`selfalign.training`
does), so evaluation and the CLI use it without the training code.
"""

from __future__ import annotations

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

    def to_dict(self) -> dict:
        return asdict(self)


def read_instruction(path: str | Path = PRINCIPLES_DIR / "verbose_prompt.yaml") -> str:
    data = read_yaml(path, ValueError)
    if not isinstance(data.get("instruction"), str) or not data["instruction"].strip():
        raise ValueError(f"{path}: 'instruction' is missing or empty")
    return data["instruction"]
