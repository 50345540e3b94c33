"""LoRA fine-tuning shared by stages 3 and 4, one concept a module:

- `examples`: records in the chat format as token ids with a loss mask, the identity
  conversations, the held-out split
- `settings`: `TrainSettings`, the seeded batch schedule, processes and loading the base model
- `lora`: the training loop (peft LoRA through accelerate)
- `checkpoints`: saving and resuming a run, refusing pickled checkpoints unless allowed
- `adapters`: an adapter directory, applying it to a model and taking it out again
- `compare`: answer log-probabilities under the base and the adapted model, the loss curve
- `fit`: what the stages call: records in, adapter and comparison out

The conversation format itself is `selfalign.chat_format`, since evaluation and the CLI speak it
without training. Importing this package does not import torch; the functions do when called.
"""

from .adapters import (adapted_for_generation, adapter_info, adapters_for_generation, apply_adapter, generation_model,
                       model_shape, remove_adapter)
from .checkpoints import CheckpointError
from .compare import answer_logprobs, compare_on, plot_loss
from .examples import Example, build_examples, load_identity, loss_mask_html, split_holdout
from .fit import fit_and_compare
from .lora import train_lora
from .settings import TrainSettings, batch_schedule, load_for_training, process_state, train_settings

__all__ = [
    "CheckpointError", "Example", "TrainSettings", "adapted_for_generation", "adapter_info", "adapters_for_generation",
    "answer_logprobs", "apply_adapter", "batch_schedule", "build_examples", "compare_on", "fit_and_compare", "generation_model",
    "load_for_training", "load_identity", "loss_mask_html", "model_shape", "plot_loss", "process_state", "remove_adapter",
    "split_holdout", "train_lora", "train_settings",
]
