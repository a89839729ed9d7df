"""The models `pipeline serve` answers with: every trained recommender and generator of the workspace, and the
registry's versions of each, loaded on first use (pipeline/serve.py is the API over them).

A model is named by a reference:
- `workspace`: the workspace's C2-CRS file of that kind (finetune_rec's recommender, finetune_conv's generator);
- `workspace:NAME`: the workspace's file of evaluate's model NAME (recommenders: evaluate.model_files, e.g.
  `workspace:kgsf`, `workspace:c2crs_wo_sd`, `workspace:c2crs-repeat-choice`; generators: conv_runs.conv_model_files,
  e.g. `workspace:transformer`, `workspace:redial`). A model whose file is missing is not listed;
- `NAME/VERSION`, `NAME@ALIAS` or `NAME`: a registered version (evaluate registers model NAME's files as
  stage_log.registered_name(NAME, kind), e.g. kgsf-recommender, transformer-generator), usable when it was trained
  on this workspace's data. C2-CRS with the learned repeat choice has no registered model of its own (it re-ranks
  C2-CRS's scores), so it is served from the workspace only.
"""

import re
import threading
from collections import OrderedDict
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.registry import CHAMPION, all_versions, data_differences, logged_metrics, model_file, resolve
from pipeline.talk import CHAT_MODELS, chat_model_files, workspace_model
from pipeline.tracking import tracking_uri
from stages import evaluate
from stages.chat.catalogue import generator_label, load_generator, load_recommender, recommender_label
from stages.chat.engine import Knowledge
from stages.evaluation.rec_metrics import REPEAT_CHOICE
from stages.io.graph import stage_making
from stages.io.outputs import settle_workspace
from stages.io.stage_log import registered_name
from stages.training import conv_runs
from stages.training.runs import TRAINING_INPUTS

WORKSPACE = "workspace"  # the model reference of the workspace's own C2-CRS files; "workspace:NAME" another model's
KEPT_MODELS = 4  # loaded versions besides the start-up pair
LOADERS = {"recommender": load_recommender, "generator": load_generator}
LABELS = {"recommender": recommender_label, "generator": generator_label}
METRICS = {"recommender": "valid_recall_at_50", "generator": "valid_perplexity"}


class Busy(Exception):
    pass


class Models:
    """The workspace's Knowledge and the loaded models. The start-up pair is the default; other models and versions
    are loaded on first use and the last KEPT_MODELS kept. One request at a time runs on them (the lock)."""

    def __init__(self, params, workspace: Path, models_from: str):
        self.params, self.workspace, self.models_from = params, workspace, models_from
        settle_workspace(workspace)  # a killed stage's half-made set, completed before the server reads it
        self.names = {kind: registered_name("c2crs", kind) for kind in CHAT_MODELS}
        files = chat_model_files(workspace, models_from)
        self.files = {
            "recommender": evaluate.model_files(params, workspace),
            "generator": conv_runs.conv_model_files(params, workspace),
        }
        self.registered_names = {  # registered name -> evaluate's model name, per kind
            kind: {registered_name(name, kind): name for name in self.files[kind] if name != REPEAT_CHOICE}
            for kind in CHAT_MODELS
        }
        self.knowledge = Knowledge(params, workspace)
        self.default = {kind: self._reference(kind, files[kind]) for kind in CHAT_MODELS}
        self.loaded: OrderedDict[tuple[str, str], object] = OrderedDict()
        self.pinned = {
            (kind, self.default[kind]): LOADERS[kind](files[kind], self.knowledge, "c2crs") for kind in CHAT_MODELS
        }
        self.lock = threading.Lock()
        self.input_hashes: dict[str, str] = {}  # the workspace's training inputs, hashed once

    def _reference(self, kind: str, loaded: Path) -> str:
        """How a start-up model is named: NAME/VERSION of the champion when chat_model_files took it, else
        'workspace'."""
        if loaded == workspace_model(self.workspace, kind):
            return WORKSPACE
        return self._version_of(f"{self.names[kind]}@{CHAMPION}")

    def model(self, kind: str, reference: str | None) -> tuple[object, str]:
        """(the loaded model of a kind named by reference, None: the start-up one; the NAME/VERSION it is, or
        'workspace[:NAME]'). An alias or a bare name is looked up on every request, so a champion that moved while
        the server runs is the one used, and a version is loaded once whatever named it. Called under the lock."""
        reference = self._version_of(reference or self.default[kind])
        key = (kind, reference)
        if key in self.pinned:
            return self.pinned[key], reference
        if key not in self.loaded:
            self.loaded[key] = self._load(kind, reference)
            while len(self.loaded) > KEPT_MODELS:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(key)
        return self.loaded[key], reference

    def _version_of(self, reference: str) -> str:
        """NAME/VERSION for NAME@ALIAS or NAME (registry.resolve's rules); `workspace:c2crs` as `workspace`; other
        references as they are."""
        if reference == f"{WORKSPACE}:c2crs":
            return WORKSPACE
        if reference.startswith(WORKSPACE) or self.models_from == WORKSPACE or re.fullmatch(r"[^@/]+/\d+", reference):
            return reference
        version = resolve(MlflowClient(tracking_uri()), reference)
        return f"{version.name}/{version.version}"

    def _load(self, kind: str, reference: str):
        if reference == WORKSPACE or reference.startswith(f"{WORKSPACE}:"):
            name = reference.partition(":")[2] or "c2crs"
            return LOADERS[kind](self._workspace_file(kind, name, reference), self.knowledge, name)
        if self.models_from == WORKSPACE:
            raise ValueError(
                f"{reference}: this server was started with --models-from workspace; it uses the workspace's files "
                f"only ({', '.join(c['reference'] for c in self._workspace_choices(kind))})"
            )
        client = MlflowClient(tracking_uri())
        version = resolve(client, reference)
        name = self.registered_names[kind].get(version.name)
        if name is None:
            raise ValueError(f"{reference}: not a {kind} this chat can use ({', '.join(self.choices_of(kind))})")
        differs = data_differences(version, self._inputs(), self.input_hashes)
        if differs:
            raise ValueError(f"{reference}: trained on other data than this workspace's ({', '.join(differs)} differ)")
        return LOADERS[kind](model_file(client, version), self.knowledge, name)

    def _workspace_file(self, kind: str, name: str, reference: str) -> Path:
        """The workspace's file of model `name`; an error naming what is wrong when it is unknown or not trained."""
        if name not in self.files[kind]:
            known = ", ".join(self.files[kind])
            raise ValueError(f"{reference}: this workspace has no {kind} {name!r} (evaluate's {kind}s: {known})")
        file = self.files[kind][name]
        if not file.is_file():
            needed = str(file.relative_to(self.workspace))
            stage = stage_making(needed)
            raise ValueError(
                f"{reference}: {kind} {name} is not trained in this workspace ({needed} is missing; stage {stage} "
                f"makes it: python -m pipeline repro {stage})"
            )
        return file

    def _inputs(self) -> dict[str, Path]:
        return {name: self.workspace / path for name, path in TRAINING_INPUTS.items()}

    def choices_of(self, kind: str) -> list[str]:
        """The registered names whose versions the chat can use: every model evaluate scores of that kind."""
        return list(self.registered_names[kind])

    def _workspace_choices(self, kind: str) -> list[dict]:
        """The workspace's trained files of a kind (C2-CRS's first), as picker entries."""
        return [
            {
                "reference": WORKSPACE if name == "c2crs" else f"{WORKSPACE}:{name}",
                "model": name,
                "label": f"{LABELS[kind](name)}: this workspace's file",
                "usable": True,
                "loaded_at_start": self.default[kind] == WORKSPACE and name == "c2crs",
            }
            for name, file in sorted(self.files[kind].items(), key=lambda item: item[0] != "c2crs")
            if file.is_file()
        ]

    def registered(self) -> dict[str, list[dict]]:
        """Per kind, the models a user can pick: the workspace's trained files and every registered version of a
        usable name, with its aliases, validation metric and whether it was trained on this workspace's data."""
        out = {kind: self._workspace_choices(kind) for kind in CHAT_MODELS}
        if self.models_from == WORKSPACE:
            return out
        client = MlflowClient(tracking_uri())
        for kind in CHAT_MODELS:
            for name in self.choices_of(kind):
                versions = all_versions(client, name)
                aliases = client.get_registered_model(name).aliases if versions else {}
                for version in reversed(versions):
                    out[kind].append(self._version_choice(client, kind, version, aliases))
        return out

    def _version_choice(self, client: MlflowClient, kind: str, version, aliases: dict) -> dict:
        differs = data_differences(version, self._inputs(), self.input_hashes)
        reference = f"{version.name}/{version.version}"
        named = sorted(a for a, v in aliases.items() if str(v) == str(version.version))
        return {
            "reference": reference,
            "model": self.registered_names[kind][version.name],
            "aliases": named,
            "label": reference + (f" ({', '.join(named)})" if named else ""),
            METRICS[kind]: logged_metrics(client, version).get(METRICS[kind]),
            "usable": not differs,
            "why_not": f"trained on other data ({', '.join(differs)} differ)" if differs else None,
            "loaded_at_start": self.default[kind] == reference,
        }

    def run(self, work, timeout: float):
        """work() under the lock, giving up (Busy) when the lock is not free before the deadline."""
        if not self.lock.acquire(timeout=timeout):
            raise Busy
        try:
            return work()
        finally:
            self.lock.release()
