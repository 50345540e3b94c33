"""configs/accelerate/: accelerate reads every file and derives from it what docs/stages.md says it
launches, and the commands written in the files and in docs/stages.md use the stage's real flags.

Nothing here starts a process or needs a GPU: accelerate's own launcher code parses the command
line and the file and prepares torchrun's arguments and environment, and torchrun turns those into
its launch configuration, where `accelerate launch` would then start the processes.
(`_validate_launch_command` and `_filter_args` are accelerate's private steps between the two.)
"""

import re
import shlex

import pytest
import torch.distributed.run as torchrun
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _filter_args, _validate_launch_command, launch_command_parser
from accelerate.utils import prepare_multi_gpu_env

from conftest import REPO
from selfalign.cli import _parser

CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
TRAINING = ["-m", "selfalign", "stage", "engrave", "--run", "R"]


def launch(config, *options):
    """accelerate launch's arguments and the processes' environment for a config file, as on a node."""
    args = launch_command_parser().parse_args(["--config_file", str(config), *options, *TRAINING])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args) if args.use_fsdp or args.multi_gpu else {}
    return args, env


def torchrun_config(args):
    """What torchrun would launch on this node, from accelerate's arguments."""
    forwarded = _filter_args(args, torchrun.get_args_parser(), ["--training_script", args.training_script,
                                                                "--training_script_args", args.training_script_args])
    config, _, script_args = torchrun.config_from_args(forwarded)
    return config, script_args


def test_the_configurations_are_there():
    assert {c.name for c in CONFIGS} >= {"fsdp_8gpu.yaml", "fsdp_multinode.yaml", "qlora_1gpu.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_accelerate_reads_every_file(config):
    settings = ClusterConfig.from_yaml_file(config)  # refuses keys accelerate does not know
    assert settings.num_processes >= 1 and settings.num_machines >= 1
    assert settings.num_processes % settings.num_machines == 0
    assert settings.mixed_precision == "bf16"  # every file is for GPUs with bf16


def test_one_gpu_qlora_is_one_process():
    args, _ = launch(REPO / "configs" / "accelerate" / "qlora_1gpu.yaml")
    assert not (args.use_fsdp or args.multi_gpu) and args.num_processes == 1 and args.gpu_ids == "0"


def test_fsdp_shards_decoder_layers_over_eight_processes():
    args, env = launch(REPO / "configs" / "accelerate" / "fsdp_8gpu.yaml")
    assert args.use_fsdp and args.num_machines == 1 and args.nproc_per_node == "8"
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_multinode_gives_each_node_its_rank_and_the_main_address():
    config = REPO / "configs" / "accelerate" / "fsdp_multinode.yaml"
    # The second node, as docs/stages.md's Slurm script launches it (a rank other than 0 checks no port).
    args, env = launch(config, "--machine_rank", "1", "--main_process_ip", "192.168.1.7")
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true"
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "192.168.1.7:29500")
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    node, script_args = torchrun_config(args)
    assert (node.min_nodes, node.max_nodes, node.nproc_per_node) == (2, 2, 8)
    assert (node.rdzv_endpoint, node.rdzv_configs["rank"]) == ("192.168.1.7:29500", 1)
    assert script_args[-len(TRAINING):] == TRAINING
    # Other cluster sizes: the command line wins over the file.
    args, _ = launch(config, "--num_machines", "4", "--num_processes", "32", "--machine_rank", "3",
                     "--main_process_ip", "192.168.1.7")
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("4", "8", 3)


def written_commands() -> list[tuple[str, str]]:
    """Every `accelerate launch ... -m selfalign stage ...` in the configs' comments and docs/stages.md."""
    found = []
    for config in CONFIGS:
        comment = "\n".join(line[1:] for line in config.read_text().splitlines() if line.startswith("#"))
        found += [(config.name, text) for text in re.findall(r"accelerate launch (?:[^\n]*\\\n)*[^\n]*",
                                                            comment)]
    docs = (REPO / "docs" / "stages.md").read_text(encoding="utf-8")
    found += [("docs/stages.md", text) for text in re.findall(r"accelerate launch (?:[^\n`]*\\\n)*[^\n`']*", docs)
              if "-m selfalign stage" in text]
    return found


def test_written_commands_use_real_flags_and_files():
    commands = written_commands()
    assert len([c for c in commands if c[0] == "docs/stages.md"]) >= 3 and len(commands) >= 6
    for where, text in commands:
        words = shlex.split(text.replace("\\\n", " ").replace("$", "X"))
        config = words[words.index("--config_file") + 1]
        assert (REPO / config).is_file(), f"{where}: {config} does not exist"
        stage = words[words.index("-m") + 2:]
        try:
            _parser().parse_args(stage)
        except SystemExit:
            pytest.fail(f"{where}: `selfalign {' '.join(stage)}` has a flag the stage does not know")
