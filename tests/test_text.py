"""The paper's NLP experiment (Appendix B.2): BERT text encoders behind the same stages. A tiny
text world through the real `dvc repro` gives Table 6 and Table 7's rows; the features are
BERT's pooled [CLS] output, the heads the fine-tuned ones; merge methods run unchanged on BERT
state dicts; the real setting's loading code reads Hub-layout models and datasets."""
from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import BIN, make_project, run
from pipeline.world import texts

TINY_TEXT = {
    "modality": "text",
    "tasks": ["agnews", "yelp", "dbpedia"],
    "source": "world",
    "world": {"seed": 0, "n_train": 400, "n_test": 64, "length": 12, "noise": 0.1},
    "model": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64, "max_length": 16},
    "pretrain": {"steps": 30, "batch_size": 32, "lr": 0.002, "weight_decay": 0.01, "corpus": 400, "mask": 0.15},
    "finetune": {"steps": 40, "batch_size": 32, "lr": 0.002, "weight_decay": 0.1, "warmup": 4},
    "merge": {"weight_averaging": {}, "task_arithmetic": {"scaling": 0.3},
              "lw_adamerging": {"method": "adamerging", "layer_wise": True, "steps": 3, "batch_size": 8}},
    "mtl": {"steps": 20, "batch_size": 32, "lr": 0.002, "weight_decay": 0.1, "warmup": 2},
}


def tiny_text_params() -> dict:
    """The text world above; extraction, surgery, router and analyses (on its merge entries) as
    the tiny image world's."""
    from conftest import TINY

    params = copy.deepcopy({**{k: TINY[k] for k in ("extract", "surgery", "adapters", "router", "analyses")},
                            **TINY_TEXT})
    for section in params["analyses"].values():
        if "methods" in section:
            section["methods"] = [m for m in section["methods"] if m in params["merge"]]
    return params


@pytest.fixture(scope="module")
def text_project(tmp_path_factory):
    path = make_project(tmp_path_factory.mktemp("text") / "project", tiny_text_params())
    run([str(BIN / "dvc"), "repro", "-q", "evaluate"], path)
    return path


def metrics(project) -> dict:
    return json.loads((project / "results" / "metrics.json").read_text())


def test_text_world_repro_gives_table_6_and_table_7_rows(text_project):
    """Per task and on average: accuracy of each merge with and without surgery (Table 6) and
    its representation bias (Table 7); the baselines beside them; surgery lowers the bias."""
    figures = metrics(text_project)
    tasks = TINY_TEXT["tasks"]
    assert {"pretrained", "individual", "mtl", *TINY_TEXT["merge"]} <= set(figures)
    for key in TINY_TEXT["merge"]:
        for figure in ("acc", "surgery_acc", "bias", "surgery_bias"):
            assert set(figures[key][figure]) == {*tasks, "avg"}, (key, figure)
        assert figures[key]["surgery_bias"]["avg"] < figures[key]["bias"]["avg"], key
    table = (text_project / "results" / "accuracy.md").read_text()
    assert table.splitlines()[0].startswith("| method | Agnews | Yelp | Dbpedia | Avg | bias avg")
    assert "| Pretrained (fine-tuned heads) |" in table and "| Weight Averaging + surgery |" in table


def test_text_heads_are_the_fine_tuned_ones_and_features_are_berts_pooled_cls_output(text_project):
    """The heads stage passes on the heads fine-tuned with each encoder; each store holds what
    transformers' own BertModel gives as `pooler_output` for the tokenized test texts."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from cache import open_store

    heads = load_file(str(text_project / "models" / "heads.safetensors"))
    finetuned = load_file(str(text_project / "models" / "finetuned" / "_heads.safetensors"))
    assert heads.keys() == finetuned.keys() and all(torch.equal(heads[t], finetuned[t]) for t in heads)
    spec = json.loads((text_project / "models" / "pretrained" / "bert.json").read_text())
    tokenizer = BertTokenizerFast.from_pretrained(str(text_project / "models" / "pretrained"))
    figures = metrics(text_project)
    for task in TINY_TEXT["tasks"]:
        model = BertModel(BertConfig(**spec["config"])).eval()
        model.load_state_dict(load_file(str(text_project / "models" / "finetuned" / f"{task}.safetensors")))
        table = pq.read_table(text_project / "data" / task / "data" / "test-00000-of-00001.parquet")
        batch = tokenizer(table["text"].to_pylist(), max_length=spec["max_length"], truncation=True,
                          padding="max_length", return_tensors="pt")
        with torch.no_grad():
            expected = model(**batch).pooler_output
        stored = open_store(text_project / "features" / "individual" / f"{task}-test.zarr").to_numpy()
        assert np.allclose(stored, expected.numpy(), atol=1e-5), task
        unit = torch.nn.functional.normalize(expected, dim=-1)
        accuracy = ((unit @ heads[task].T).argmax(1).numpy() == table["label"].to_numpy()).mean() * 100
        assert figures["individual"]["acc"][task] == pytest.approx(accuracy, abs=1e-3)


BERT_SIZES = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=16)


def bert_state(seed: int) -> dict:
    from pipeline.models import bert

    torch.manual_seed(seed)
    return bert.build_encoder({"config": BERT_SIZES}).state_dict()


@pytest.mark.parametrize("name", ["weight_averaging", "task_arithmetic", "ties_merging", "tsv_merging", "iso_c",
                                  "iso_cts", "wudi_merging", "consensus_task_arithmetic"])
def test_every_data_free_merge_runs_unchanged_on_a_bert_state_dict(name):
    from pipeline.merging import registry
    from pipeline.merging.inputs import MergeInputs

    pretrained = bert_state(0)
    finetuned = [{k: v + 0.01 * torch.randn_like(v) for k, v in pretrained.items()} for _ in range(3)]
    method = registry.get(name)
    params = method.params(**({"iterations": 5} if name == "wudi_merging" else {}))
    merged = method.run(MergeInputs("test", ["a", "b", "c"], pretrained, finetuned), params).state
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in pretrained.items()}
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_wudi_finds_berts_block_linears_by_name_and_shape():
    """WUDI's authors merge the blocks' linear layers only: in BERT query, key, value, the
    attention output and the MLP's two (no embeddings, LayerNorms, biases or pooler)."""
    from pipeline.merging.subspaces import is_block_linear

    chosen = {k for k, v in bert_state(0).items() if is_block_linear(k, v)}
    linear = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")
    assert chosen == {f"encoder.layer.{i}.{name}.weight" for i in range(2) for name in linear}


def test_text_tasks_are_written_as_hugging_face_text_shards_deterministically(tmp_path):
    for root in (tmp_path / "a", tmp_path / "b"):
        texts.write_task(root, "yahoo", n_train=50, n_test=20, seed=3)
    table = pq.read_table(tmp_path / "a" / "yahoo" / "data" / "test-00000-of-00001.parquet")
    assert table.column_names == ["text", "label"] and table.num_rows == 20
    assert set(table["label"].to_pylist()) <= set(range(len(texts.classnames("yahoo"))))
    assert (tmp_path / "a" / "yahoo" / "data" / "train-00000-of-00001.parquet").read_bytes() == \
           (tmp_path / "b" / "yahoo" / "data" / "train-00000-of-00001.parquet").read_bytes()
    words = set(texts.vocabulary(list(texts.TASKS)))
    assert all(set(t.split()) <= words for t in table["text"].to_pylist())


def write_hub_like_source(root, tokens: list[str]) -> dict:
    """A BERT model folder and a Yahoo-layout dataset (three text columns, `topic`) as
    `repsurgery fetch` leaves them, and params `source` pointing at them."""
    from transformers import BertConfig, BertForSequenceClassification

    model = root / "bert"
    model.mkdir(parents=True)
    config = BertConfig(**{**BERT_SIZES, "vocab_size": 5 + len(tokens)})
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(model)  # a BertFor* model: its head is dropped
    (model / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *tokens]) + "\n")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        topic = rng.integers(0, 10, n)
        columns = {"id": np.arange(n), "topic": topic, "question_title": [f"title {tokens[t]}" for t in topic],
                   "question_content": [None if i % 3 else "content" for i in range(n)],
                   "best_answer": ["answer"] * n}
        path = root / "yahoo" / "yahoo_answers_topics" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), path)
    return {"family": "surgery_bert", "splits": ["test", "train"], "cache": str(root / "cache"),
            "pretrained": {"arch": "bert-base-uncased", "weights": str(model)},
            "datasets": {"yahoo": str(root / "yahoo")}}


def test_the_real_text_setting_imports_a_hub_bert_and_a_hub_dataset_and_fine_tunes_here(tmp_path, monkeypatch):
    """Stages data, pretrained and finetuned of the paper-bert preset on stand-ins of its Hub
    files: the dataset's columns joined into `text`, BERT's config, vocabulary and encoder
    weights imported exactly, and each task's encoder fine-tuned with its head."""
    from pipeline import config, workspace
    from pipeline.errors import PipelineError
    from pipeline.models import bert
    from stages.heads import build_heads
    from stages.prepare import prepare_data, prepare_finetuned, prepare_pretrained
    from stages.presets import preset_text

    tokens = ["title", "content", "answer", *(f"word{i}" for i in range(10))]
    raw = yaml.safe_load(preset_text("paper-bert"))
    raw.update(tasks=["yahoo"], source=write_hub_like_source(tmp_path, tokens),
               finetune={"steps": 2, "batch_size": 4, "lr": 1e-4, "weight_decay": 0.01, "warmup": 1})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPSURGERY_QUIET", "1")
    with pytest.raises(PipelineError, match=r"model.max_length` = 128: expected at most the 16 positions"):
        prepare_pretrained(config.validate(raw), torch.device("cpu"))
    raw["model"]["max_length"] = BERT_SIZES["max_position_embeddings"]
    params = config.validate(raw)
    prepare_data(params)
    table = pq.read_table(workspace.DATA / "yahoo" / "data" / "test-00000-of-00001.parquet")
    source = pq.read_table(tmp_path / "yahoo" / "yahoo_answers_topics" / "test-00000-of-00001.parquet")
    assert table.column_names == ["text", "label"] and table["label"].to_pylist() == source["topic"].to_pylist()
    assert table["text"][0].as_py() == " ".join(filter(None, (source["question_title"][0].as_py(),
                                                              source["question_content"][0].as_py() or "",
                                                              source["best_answer"][0].as_py())))
    prepare_pretrained(params, torch.device("cpu"))
    hub = load_file(str(tmp_path / "bert" / "model.safetensors"))
    ours = bert.encoder_state(workspace.PRETRAINED)
    assert all(torch.equal(ours[k], hub[f"bert.{k}"]) for k in ours) and "classifier.weight" not in ours
    assert bert.read_spec(workspace.PRETRAINED)["max_length"] == params.model.max_length
    prepare_finetuned(params, torch.device("cpu"))
    build_heads(params, torch.device("cpu"))
    assert load_file(str(workspace.HEADS))["yahoo"].shape == (10, BERT_SIZES["hidden_size"])


def test_text_params_refuse_fine_tuned_entries_and_a_missing_train_split():
    from pipeline import config
    from pipeline.errors import PipelineError
    from stages.presets import preset_text

    raw = yaml.safe_load(preset_text("paper-bert"))
    assert config.validate(raw).source.family == "surgery_bert"
    with pytest.raises(PipelineError, match=r"source.finetuned.*stage finetuned fine-tunes"):
        config.validate({**raw, "source": {**raw["source"], "finetuned": {"agnews": "x.safetensors"}}})
    with pytest.raises(PipelineError, match=r"source.splits.*holds train"):
        config.validate({**raw, "source": {**raw["source"], "splits": ["test"]}})
    with pytest.raises(PipelineError, match=r"tasks of the miniature text world: agnews"):
        config.validate({**tiny_text_params(), "tasks": ["digits"]})


def test_the_papers_table_6_and_7_figures_are_published_with_their_source():
    from pipeline.reporting import published

    accuracy = published.rows("surgery_bert", "bert-base-uncased")
    bias = published.rows("surgery_bert", "bert-base-uncased", "bias")
    assert published.tasks("surgery_bert") == ["agnews", "yelp", "amazon", "yahoo", "dbpedia"]
    assert accuracy["weight_averaging"]["avg"] == 55.8 and accuracy["task_arithmetic+surgery"]["avg"] == 74.4
    assert bias["weight_averaging"]["avg"] == 0.418 and bias["task_arithmetic+surgery"]["avg"] == 0.192
    for rows in (accuracy, bias):
        for key, row in rows.items():
            values = [v for t, v in row.items() if t != "avg"]
            assert abs(sum(values) / len(values) - row["avg"]) < 0.1, key  # as printed, rounded
    assert "Table 6" in published.describe("surgery_bert", "bert-base-uncased")["source"]


def test_fetch_lists_berts_model_folder_and_both_splits_of_every_dataset():
    from pipeline import config
    from pipeline.data import sources
    from stages.presets import preset_text

    params = config.validate(yaml.safe_load(preset_text("paper-bert")))
    (what, ref, patterns), *datasets = sources.fetch_items(params.source, params.tasks)
    assert what == "pretrained bert-base-uncased" and ref.uri == "hf://google-bert/bert-base-uncased"
    assert ["config.json", "vocab.txt", "model.safetensors"] in patterns
    assert {item[0] for item in datasets} == {f"{t} {s} split" for t in params.tasks for s in ("test", "train")}


def test_doctor_checks_a_text_workspace_like_an_image_one(text_project):
    from conftest import cli

    done = cli(text_project, "doctor")
    assert done.returncode == 0 and "PROBLEM" not in done.stderr, done.stderr


def test_text_params_without_transformers_stop_at_the_first_stage_naming_the_extra(monkeypatch, tmp_path):
    """The image world installs without transformers: a text run without it stops in stage
    check, before any stage deletes its outputs, with the command that installs it."""
    from pipeline import config
    from pipeline.errors import PipelineError
    from stages.check import check

    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # `import transformers` fails
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"need Hugging Face transformers.*make repro.*\.\[text\]"):
        check(config.validate(tiny_text_params()))
    assert not (tmp_path / "results").exists()
