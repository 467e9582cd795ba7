"""The torch backend: Kyutai's moshi.server, run unchanged through jmoshi's bootstrap (moshi_child); with
--conversations N > 1, jmoshi's conversation server over N slots of one loaded model
(conversations/torch_child.py)."""

from __future__ import annotations

import os
import sys

from .. import runtime
from ..errors import PreflightError
from ..model.precision import Precision
from .base import Backend, Features, Kind, ServerSpec
from .contract import Launch, without_contract

CONVERSATION_SERVER = "jmoshi's conversation server"


class TorchBackend(Backend):
    kind = Kind.TORCH
    server_name = "moshi.server"
    precisions = (Precision.AUTO, Precision.BF16, Precision.INT8)

    def refuse(self, wanted: Features) -> None:
        """moshi.server does everything serve offers; the runtime's own limits are checked with the model.
        Many conversations on one model need per-slot reset and exec masks (moshi 0.2.5)."""
        if wanted.conversations:
            rt = runtime.detect()
            if not rt.has_slot_masks:
                raise PreflightError(f"{wanted.conversations} needs moshi 0.2.5 or later (per-conversation reset "
                                     f"and exec masks); this runtime has moshi {rt.moshi}",
                                     "use --replicas N (one moshi.server each), or install jmoshi's current runtime")

    def device(self, asked: str) -> str:
        return "cuda" if asked == "auto" else asked

    def prepare(self, request, *, web_ui, watch=None, on_note=lambda note: None):
        from ..model.preparation import prepare_model

        return prepare_model(request, web_ui=web_ui, watch=watch, on_note=on_note)

    def for_infer(self, device):
        # moshi reads NO_TORCH_COMPILE once, when it is imported (runtime.compile_setup: off on the CPU).
        runtime.apply_compile_policy(device)

    def load_for_infer(self, files, options, device, quiet=True):
        from ..infer import generation

        return generation.load_model(files, device, options.half, options.sampling.overrides(), quiet,
                                     batch=options.batch or 1)

    def command(self, spec: ServerSpec):
        """Explicit local paths and an offline hub; the rest travels in the child's contract."""

        files = spec.files
        entry = ["jmoshi_cli.moshi_child"] if spec.conversations == 1 else \
            ["jmoshi_cli.conversations.torch_child", "--conversations", str(spec.conversations)]
        argv = [sys.executable, "-m", *entry,
                "--host", spec.host, "--port", str(spec.port),
                "--hf-repo", spec.repo,
                "--moshi-weight", str(files.moshi_weight),
                "--mimi-weight", str(files.mimi_weight),
                "--tokenizer", str(files.tokenizer),
                "--static", str(files.web_ui),
                "--device", spec.device]
        if spec.half:
            argv.append("--half")
        if files.lora is not None:
            argv += ["--lora-weight", str(files.lora)]  # with its config.json, which says `lora` (config_path)
        if spec.ssl_dir is not None:
            argv += ["--ssl", str(spec.ssl_dir)]
        env = without_contract(os.environ if spec.base_env is None else spec.base_env)
        env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.update(runtime.compile_setup(spec.device, env)[0])  # NO_TORCH_COMPILE=1 on the CPU (runtime.py)
        name = self.server_name if spec.conversations == 1 else CONVERSATION_SERVER
        return Launch(argv, env, spec.host, spec.port, spec.scheme, spec.contract, name, spec.conversations)
