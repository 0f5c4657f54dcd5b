"""ClassTokens: the file format, diffusers interoperability, DA-Fusion import, applying to pipelines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import CLASS_NAMES, FAST, random_image, with_header_length
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from dafusion_aug import ClassTokens
from dafusion_aug.errors import TokenFileError
from dafusion_aug.testing import tiny_pipeline
from dafusion_aug.tokens import token_for_class

NAMES = ["cat", "golden retriever", "zebra"]


def make_tokens(num_vectors=1, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ClassTokens(NAMES, [torch.randn(num_vectors, dim, generator=g) for _ in NAMES], metadata={"base_model": "abc", "steps": 3})


def test_token_names_are_slugs():
    assert token_for_class("Golden Retriever") == "<golden-retriever>"
    assert token_for_class("a/../b\x00c") == "<a-b-c>"
    assert token_for_class("猫", 4) == "<class-4>"
    with pytest.raises(ValueError, match="pass its index"):
        token_for_class("猫")
    assert len(token_for_class("x" * 500)) <= 50


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_save_load_round_trip_and_format(tmp_path, num_vectors):
    toks = make_tokens(num_vectors)
    path = toks.save(tmp_path / "t.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(toks.tokens)
        assert f.get_tensor("<zebra>").dtype == torch.float32
        assert tuple(f.get_tensor("<zebra>").shape) == (num_vectors, 32)
    assert meta["format"] == "pt" and json.loads(meta["class_names"]) == NAMES
    assert json.loads(meta["tokens"]) == toks.tokens and meta["num_vectors"] == str(num_vectors)
    assert meta["base_model"] == "abc" and json.loads(meta["training"])["steps"] == 3
    back = ClassTokens.load(path)
    assert back.class_names == NAMES and back.content_hash() == toks.content_hash()
    assert back.metadata["base_model"] == "abc"
    assert not list(tmp_path.glob(".tmp-*"))


def test_apply_is_idempotent_and_conflicts_raise():
    pipe = tiny_pipeline()
    toks = make_tokens(2)
    toks.apply(pipe)
    size = len(pipe.tokenizer)
    toks.apply(pipe)
    assert len(pipe.tokenizer) == size
    other = make_tokens(2, seed=1)
    with pytest.raises(TokenFileError, match="already in the tokenizer vocabulary"):
        other.apply(pipe)
    other.apply(pipe, replace=True)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<cat>", "<cat>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], other.embeddings[0])


def test_apply_refuses_vocabulary_words_and_wrong_dim():
    pipe = tiny_pipeline()
    clash = ClassTokens(["photo"], [torch.randn(1, 32)], tokens=["photo</w>"])
    with pytest.raises(TokenFileError, match="already in the tokenizer"):
        clash.apply(pipe, replace=True)
    with pytest.raises(TokenFileError, match="dim 16"):
        ClassTokens(["x"], [torch.randn(1, 16)]).apply(pipe)


def test_export_loads_into_plain_diffusers_pipeline(tmp_path):
    toks = make_tokens(2)
    paths = toks.export_diffusers(tmp_path / "export")
    assert [p.parent.name for p in paths] == ["cat", "golden-retriever", "zebra"]
    pipe = tiny_pipeline()
    pipe.load_textual_inversion(str(paths[1].parent))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<golden-retriever>", "<golden-retriever>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], toks.embeddings[1])


def test_saved_file_loads_with_load_textual_inversion(tmp_path):
    """The multi-class file itself loads in plain diffusers, as lists of tensors and tokens."""
    toks = make_tokens()
    path = toks.save(tmp_path / "t.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors = [f.get_tensor(t) for t in toks.tokens]
    pipe = tiny_pipeline()
    pipe.load_textual_inversion(tensors, token=toks.tokens)
    ids = pipe.tokenizer.convert_tokens_to_ids(toks.tokens)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], torch.cat(toks.embeddings))


def test_one_key_diffusers_file_loads(tmp_path):
    toks = make_tokens()
    (path,) = ClassTokens(["cat"], [toks.embeddings[0]]).export_diffusers(tmp_path)
    back = ClassTokens.load(path)
    assert back.tokens == ["<cat>"] and back.class_names == ["cat"]


def test_from_dafusion_imports_pt_files(tmp_path):
    data = {"<golden_retriever>": torch.randn(32), "<cat>": torch.randn(32)}
    torch.save(data, tmp_path / "tokens.pt")
    toks = ClassTokens.from_dafusion(tmp_path / "tokens.pt", class_names=["cat", "golden retriever"])
    assert toks.tokens == ["<cat>", "<golden-retriever>"]
    assert torch.equal(toks.embeddings[1][0], data["<golden_retriever>"])
    with pytest.raises(TokenFileError, match="no tokens for classes"):
        ClassTokens.from_dafusion(tmp_path / "tokens.pt", class_names=["dog"])


def test_from_dafusion_refuses_arbitrary_objects(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"<cat>": Evil()}, f)
    with pytest.raises(TokenFileError, match="weights_only"):
        ClassTokens.from_dafusion(tmp_path / "evil.pt")


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not a readable safetensors"),
        (b"\x80\x04junk", "pickle"),
        (b"PK\x03\x04zip", "pickle"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "not a readable safetensors"),
    ],
)
def test_load_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(TokenFileError, match=match):
        ClassTokens.load(path)


def test_load_rejects_truncated_file(tmp_path):
    path = make_tokens().save(tmp_path / "t.safetensors")
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(TokenFileError, match=str(path.name)):
        ClassTokens.load(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(TokenFileError, match="nope.safetensors"):
        ClassTokens.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_names=[], embeddings=[]), "at least one class"),
        (dict(class_names=["a", "a"], embeddings=[torch.zeros(1, 4)] * 2), "unique"),
        (dict(class_names=["a", "b"], embeddings=[torch.zeros(1, 4)]), "one entry per class"),
        (dict(class_names=["a", "b"], embeddings=[torch.zeros(1, 4), torch.zeros(2, 4)]), "one shape"),
        (dict(class_names=["a"], embeddings=[torch.tensor([[float("nan")]])]), "finite"),
        (dict(class_names=["A b", "a-b"], embeddings=[torch.zeros(1, 4)] * 2), "same token"),
        (dict(class_names=["a"], embeddings=[torch.zeros(1, 4)], tokens=["has space"]), "without spaces"),
        (dict(class_names="cat", embeddings=[torch.zeros(1, 4)] * 3), r"for one class pass \['cat'\]"),
        (dict(class_names=["cat"], embeddings=[torch.zeros(1, 4)], tokens="<cat>"), r"tokens must be a list of token strings"),
        (dict(class_names=[1, 2], embeddings=[torch.zeros(1, 4)] * 2), "must hold str class names, got int 1"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ClassTokens(**kwargs)



def test_token_files_of_every_header_length_load(tmp_path):
    """A safetensors file starts with its header's length: every first byte must load, 0x80 (a pickle's first
    byte) included. Before issue 13, 1 token file in 32 was refused as a pickle (issue 15, item 1)."""
    path = tmp_path / "tokens.safetensors"
    seen = set()
    for k in range(1, 400):
        toks = ClassTokens(["c" * k], [torch.full((1, 32), float(k))])
        toks.save(path)
        if path.read_bytes()[0] in seen:
            continue
        seen.add(path.read_bytes()[0])
        assert ClassTokens.load(path).content_hash() == toks.content_hash()
    assert seen == set(range(0, 256, 8))  # safetensors pads headers to 8 bytes: every first byte save() can write
    for low in range(256):  # and every other one, as other writers may leave them
        toks.save(path)
        with_header_length(path, 1024 + low)
        assert path.read_bytes()[0] == low and ClassTokens.load(path).content_hash() == toks.content_hash()
    torch.save({"<c>": torch.zeros(32)}, path)  # real pickles are still refused
    with pytest.raises(TokenFileError, match="pickle"):
        ClassTokens.load(path)


# -- issue 15: shared tensors, bad metadata, empty or integer embeddings, full disks ------------------------
def test_classes_sharing_one_tensor_save_and_load(tmp_path):
    """Item 9: ClassTokens(names, [t] * 3).save() crashed with safetensors' "Some tensors share memory"."""
    t = torch.randn(2, 32)
    toks = ClassTokens(NAMES, [t] * 3)
    back = ClassTokens.load(toks.save(tmp_path / "t.safetensors"))
    assert all(torch.equal(e, t) for e in back.embeddings)
    t.zero_()  # the caller's tensor is copied, not kept
    assert not torch.equal(toks.embeddings[0], t)


def _write_token_file(path, metadata, tensors=None):
    from safetensors.torch import save_file

    save_file(tensors or {"<cat>": torch.zeros(1, 32)}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "metadata, match",
    [
        ({"tokens": "null"}, r"'tokens' must be a non-empty JSON list of strings, got null"),
        ({"tokens": '"<cat>"'}, r"'tokens' must be a non-empty JSON list of strings"),
        ({"tokens": '["<cat>"]', "class_names": "[1]"}, r"'class_names' must be a non-empty JSON list of strings, got \[1\]"),
        ({"tokens": '["<cat>"]', "class_names": '["cat", "dog"]'}, "has 2 class_names but 1 tokens"),
        ({"tokens": '["<cat>"]', "training": "[]"}, "'training' must be a JSON object"),
    ],
)
def test_bad_token_metadata_is_named_at_load(tmp_path, metadata, match):
    """Unclear errors of issue 15: tokens=null raised "'NoneType' object is not iterable"; class_names=[1, 2]
    loaded and failed later."""
    path = _write_token_file(tmp_path / "t.safetensors", {"format": "pt", **metadata})
    with pytest.raises(TokenFileError, match=match) as info:
        ClassTokens.load(path)
    assert str(path) in str(info.value)


def test_empty_or_integer_embeddings_are_refused(tmp_path):
    """A [0, dim] tensor loaded, then raised IndexError; int64 tensors were cast to float silently."""
    with pytest.raises(ValueError, match=r"at least one vector of at least one value, got shape \(0, 32\)"):
        ClassTokens(["cat"], [torch.zeros(0, 32)])
    with pytest.raises(TypeError, match="the embedding of class 'cat' must be a floating-point tensor, got dtype int64"):
        ClassTokens(["cat"], [torch.zeros(1, 32, dtype=torch.int64)])
    assert ClassTokens(["cat"], [torch.zeros(1, 32, dtype=torch.float64)]).embeddings[0].dtype == torch.float32
    for tensor, match in [(torch.zeros(0, 32), "at least one vector"), (torch.zeros(1, 32, dtype=torch.int64), "floating-point")]:
        path = _write_token_file(tmp_path / "t.safetensors", {"tokens": '["<cat>"]', "class_names": '["cat"]'}, {"<cat>": tensor})
        with pytest.raises(TokenFileError, match=match):
            ClassTokens.load(path)


def test_full_disk_on_save_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    """Token (and export) saves on a full disk raised safetensors' raw SafetensorError, without the path."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(TokenFileError, match=r"cannot write token file '.*t.safetensors': the disk is full"):
        make_tokens().save(tmp_path / "t.safetensors")
    with pytest.raises(TokenFileError, match="cannot write token file .*learned_embeds.safetensors.*: the disk is full"):
        make_tokens().export_diffusers(tmp_path / "export")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


# -- token files reaching the transform, and exports (issue 8) -------------------------------------------
def _token_file(tmp_path: Path, dim: int = 32) -> Path:
    return ClassTokens(CLASS_NAMES, [torch.randn(1, dim) for _ in CLASS_NAMES]).save(tmp_path / "tokens.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "junk", "pickle", "empty"])
def test_bad_token_file_fails_at_construction(make_aug, tmp_path, damage):
    """ClassTokens.load itself: test_tokens.py::test_load_rejects_bad_files / test_load_rejects_truncated_file."""
    path = _token_file(tmp_path)
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) - 9])
    elif damage == "junk":
        path.write_bytes(os.urandom(len(good)))
    elif damage == "pickle":
        torch.save({"<cat>": torch.randn(32)}, path)
    else:
        path.write_bytes(b"")
    with pytest.raises(TokenFileError, match="tokens.safetensors"):
        make_aug(**FAST, tokens=str(path), class_names=None)


def test_token_dimension_mismatch_is_refused_before_generating(make_aug, fresh_pipe, tmp_path):
    aug = make_aug(**FAST, pipeline=fresh_pipe, tokens=str(_token_file(tmp_path, dim=16)), class_names=None)
    size = len(fresh_pipe.tokenizer)
    with pytest.raises(TokenFileError, match="dim 16 but the text encoder's embeddings have dim 32"):
        aug(random_image(0), 0)
    assert len(fresh_pipe.tokenizer) == size and list(aug.cache.keys()) == []


@pytest.mark.parametrize("token", ["photo", "Photo", "zebra"])
def test_tokens_that_are_vocabulary_words_are_refused(fresh_pipe, token):
    """Exact vocabulary entries ('photo</w>'): test_tokens.py::test_apply_refuses_vocabulary_words_and_wrong_dim."""
    size = len(fresh_pipe.tokenizer)
    before = fresh_pipe.tokenizer.tokenize("a photo of a cat")
    with pytest.raises(TokenFileError, match="is a word of the tokenizer's vocabulary"):
        ClassTokens(["x"], [torch.randn(1, 32)], tokens=[token]).apply(fresh_pipe)
    assert len(fresh_pipe.tokenizer) == size and fresh_pipe.tokenizer.tokenize("a photo of a cat") == before


def test_tokens_that_differ_only_in_case_export_to_distinct_folders(tmp_path):
    tokens = ClassTokens(["a", "b"], [torch.randn(1, 32), torch.randn(1, 32)], tokens=["<A>", "<a>"])
    paths = tokens.export_diffusers(tmp_path)
    assert len(set(paths)) == 2
    for token, path in zip(tokens.tokens, paths):
        assert ClassTokens.load(path).tokens == [token]


# -- property: any token file round-trips (issue 15) -------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@st.composite
def class_tokens(draw):
    n = draw(st.integers(1, 4))
    names = draw(st.lists(st.text(min_size=1, max_size=20), min_size=n, max_size=n, unique=True))
    tokens = draw(st.lists(st.text(min_size=1, max_size=12).filter(lambda t: not any(c.isspace() for c in t)),
                           min_size=n, max_size=n, unique=True))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 8)))
    values = st.floats(width=32, allow_nan=False, allow_infinity=False)
    embeddings = [torch.tensor(draw(st.lists(values, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))).reshape(shape)
                  for _ in range(n)]
    metadata = draw(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k != "base_model"), JSON, max_size=3))
    if draw(st.booleans()):
        metadata["base_model"] = draw(st.text(min_size=1, max_size=16))
    return ClassTokens(names, embeddings, tokens=tokens, metadata=metadata)


@settings(max_examples=60, deadline=None)
@given(toks=class_tokens())
def test_any_token_file_round_trips(tmp_path_factory, toks):
    """Names and tokens of any text (slashes, NUL, non-ASCII), any finite float32 values (bitwise, -0.0 and
    subnormals included), any JSON metadata: what save() writes, load() reads back the same, whatever the
    header length (so whatever the file's first byte)."""
    path = tmp_path_factory.mktemp("prop") / "tokens.safetensors"
    back = ClassTokens.load(toks.save(path))
    assert back.class_names == toks.class_names and back.tokens == toks.tokens
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(back.embeddings, toks.embeddings))
    assert back.content_hash() == toks.content_hash()
    assert back.metadata == json.loads(json.dumps(toks.metadata))


# -- issue 19: the token files people have (A1111, DA-Fusion), and multi-class files in plain diffusers -----
def _prompt_embeds(pipe, prompt):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]


def test_a1111_safetensors_embedding_is_a_class_named_after_the_file(tmp_path):
    """Before, {"emb_params": tensor} was silently imported as the class "emb_params" with the token emb_params."""
    from safetensors.torch import save_file

    t = torch.randn(2, 32)
    path = tmp_path / "pickup-truck.safetensors"
    save_file({"emb_params": t}, str(path))
    toks = ClassTokens.load(path)
    assert toks.class_names == ["pickup-truck"] and toks.tokens == ["<pickup-truck>"]
    assert torch.equal(toks.embeddings[0], t) and toks.metadata["imported_from"] == "a1111"
    named = ClassTokens.from_a1111(path, class_name="truck")
    assert named.class_names == ["truck"] and torch.equal(named.embeddings[0], t)
    with pytest.raises(TypeError, match="class_name must be a non-empty str"):
        ClassTokens.from_a1111(path, class_name="")


def test_a1111_pt_embedding_loads_as_plain_diffusers_loads_it(tmp_path):
    """The .pt A1111 format ({"string_to_param": {"*": t}, "name": ...}), read with weights_only=True: the same
    values and prompt embeddings as diffusers' own load_textual_inversion of that file."""
    t = torch.randn(2, 32)
    path = tmp_path / "embedding.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": t}, "name": "pickup", "step": 500,
                "sd_checkpoint": "a1b2c3", "sd_checkpoint_name": "v1-5"}, path)
    toks = ClassTokens.from_a1111(path)
    assert toks.class_names == ["pickup"] and torch.equal(toks.embeddings[0], t)
    assert ClassTokens.from_a1111(path, class_name="truck").class_names == ["truck"]
    theirs, ours = tiny_pipeline(), tiny_pipeline()
    theirs.load_textual_inversion(str(path))
    toks.apply(ours)
    assert torch.equal(_prompt_embeds(theirs, "a photo of a pickup"), _prompt_embeds(ours, "a photo of a <pickup>"))
    with pytest.raises(TokenFileError, match=r"ClassTokens\.from_a1111\(path\)"):
        ClassTokens.load(path)  # never unpickled; the message says where to turn


def test_a1111_pt_with_objects_is_refused_by_weights_only(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": {"*": Evil()}, "name": "x"}, f)
    with pytest.raises(TokenFileError, match="weights_only"):
        ClassTokens.from_a1111(tmp_path / "evil.pt")


@pytest.mark.parametrize(
    "write, load, match",
    [
        (lambda p: _save_plain(p, {"<a>": torch.zeros(1, 32), "<b>": torch.ones(1, 32)}), "load",
         r"holds 2 tensors \['<a>', '<b>'\] but no dafusion-aug metadata.*pipe\.load_textual_inversion\(list\(sd\.values\(\)\), token=list\(sd\.keys\(\)\)\)"),
        (lambda p: _save_plain(p, {"clip_g": torch.zeros(1, 64), "clip_l": torch.zeros(1, 32)}), "load",
         r"\['clip_g', 'clip_l'\]"),
        (lambda p: _save_plain(p, {"<cat>": torch.zeros(1, 32)}), "from_a1111",
         r"not an A1111 embedding \(no 'emb_params' or 'string_to_param' key\): got \['<cat>'\]"),
        (lambda p: torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "x"}, p), "from_dafusion",
         r"is an A1111 embedding \(keys \['string_to_param', 'name'\]\).*from_a1111"),
        (lambda p: torch.save({"emb_params": torch.zeros(1, 32)}, p), "from_dafusion", "is an A1111 embedding"),
        (lambda p: torch.save({"<cat>": torch.zeros(1, 32), "step": 3}, p), "from_dafusion",
         r"must hold a dict of token -> tensor, got dict with keys \['<cat>', 'step'\]"),
    ],
    ids=["several-tensors-no-metadata", "sdxl", "a1111-without-its-keys", "a1111-pt-to-dafusion", "emb-params-pt", "not-all-tensors"],
)
def test_ambiguous_token_files_are_refused_naming_their_keys(tmp_path, write, load, match):
    """Before, {"emb_params": t} (as a .pt given to from_dafusion, like the safetensors given to load) became a class
    named emb_params, and a file of several tensors without metadata loaded in file order."""
    path = tmp_path / "file.bin"
    write(path)
    with pytest.raises(TokenFileError, match=match):
        getattr(ClassTokens, load)(path)


def _save_plain(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def test_from_dafusion_needs_class_names_when_the_order_is_unknown(tmp_path):
    """DA-Fusion's aggregated file holds its classes in merge order (['one', 'two', 'zero']), not label order:
    before, from_dafusion without class_names took that order and every label named the wrong class."""
    values = {"<one>": torch.randn(32), "<two>": torch.randn(32), "<zero>": torch.randn(32)}
    torch.save(values, tmp_path / "tokens.pt")
    with pytest.raises(ValueError, match=r"class_names is required .* \['<one>', '<two>', '<zero>'\].*load_textual_inversion"):
        ClassTokens.from_dafusion(tmp_path / "tokens.pt")
    toks = ClassTokens.from_dafusion(tmp_path / "tokens.pt", class_names=["zero", "one", "two"])
    assert toks.class_names == ["zero", "one", "two"] and torch.equal(toks.embeddings[0][0], values["<zero>"])
    torch.save({"<pickup_truck>": values["<one>"]}, tmp_path / "learned_embeds.bin")  # one class: the order is known
    assert ClassTokens.from_dafusion(tmp_path / "learned_embeds.bin").class_names == ["pickup_truck"]


@pytest.mark.parametrize("name", ["pickup_truck", "pickup truck", "<pickup_truck>"])
def test_from_dafusion_accepts_names_as_dafusion_wrote_them(tmp_path, name):
    """Before, '<pickup_truck>' came back as 'pickup truck', and class_names=['pickup_truck'] failed with
    "has no tokens"."""
    t = torch.randn(32)
    torch.save({"<pickup_truck>": t, "<cat>": torch.randn(32)}, tmp_path / "tokens.pt")
    toks = ClassTokens.from_dafusion(tmp_path / "tokens.pt", class_names=[name, "cat"])
    assert toks.class_names == [name, "cat"] and torch.equal(toks.embeddings[0][0], t)
    with pytest.raises(TokenFileError, match=r"no tokens for classes \['pickup-truck'\]; it has the tokens \['<pickup_truck>', '<cat>'\]"):
        ClassTokens.from_dafusion(tmp_path / "tokens.pt", class_names=["pickup-truck"])


def _dafusion_load_embeddings(embed_path, tokenizer, text_encoder):
    """DA-Fusion's own loader (semantic_aug/augmentations/textual_inversion.py, load_embeddings), as published,
    with weights_only=True added."""
    for token, token_embedding in torch.load(embed_path, map_location="cpu", weights_only=True).items():
        tokenizer.add_tokens(token)
        text_encoder.resize_token_embeddings(len(tokenizer))
        token_id = tokenizer.convert_tokens_to_ids(token)
        text_encoder.get_input_embeddings().weight.data[token_id] = token_embedding


def test_dafusion_files_import_bit_identical_to_dafusion_own_loader(tmp_path):
    values = {"<pickup_truck>": torch.randn(32), "<golden_retriever>": torch.randn(32)}
    torch.save(values, tmp_path / "tokens.pt")
    theirs, ours = tiny_pipeline(), tiny_pipeline()
    _dafusion_load_embeddings(tmp_path / "tokens.pt", theirs.tokenizer, theirs.text_encoder)
    toks = ClassTokens.from_dafusion(tmp_path / "tokens.pt", class_names=["golden retriever", "pickup truck"])
    toks.apply(ours)
    for token, name in [("<pickup_truck>", "pickup truck"), ("<golden_retriever>", "golden retriever")]:
        row = theirs.text_encoder.get_input_embeddings().weight[theirs.tokenizer.convert_tokens_to_ids(token)]
        assert torch.equal(row, toks.embeddings[toks.class_names.index(name)][0])
        assert torch.equal(_prompt_embeds(theirs, f"a photo of a {token}"),
                           _prompt_embeds(ours, f"a photo of a {toks.token_for(name)}"))


def _documented_multi_class_snippet() -> str:
    """The python block of docs/tokens.md that loads a multi-class file into plain diffusers."""
    import re

    from dafusion_aug.tokens import DIFFUSERS_MULTI_CLASS

    text = (Path(__file__).resolve().parents[1] / "docs" / "tokens.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if DIFFUSERS_MULTI_CLASS in b]
    assert len(blocks) == 1, "docs/tokens.md must show the one-line plain-diffusers way once"
    return blocks[0]


def test_multi_class_file_loads_in_plain_diffusers_with_the_documented_line(tmp_path, monkeypatch):
    """pipe.load_textual_inversion("tokens.safetensors") fails inside diffusers on a multi-class file; the one line
    docs/tokens.md shows (and our loaders' errors name) loads it with the same prompt embeddings as apply()."""
    toks = make_tokens(num_vectors=2)
    monkeypatch.chdir(tmp_path)
    toks.save("tokens.safetensors")
    with pytest.raises(ValueError, match="Loaded state dictionary is incorrect"):
        tiny_pipeline().load_textual_inversion("tokens.safetensors")
    theirs, ours = tiny_pipeline(), tiny_pipeline()
    exec(_documented_multi_class_snippet(), {"pipe": theirs})
    toks.apply(ours)
    for token in toks.tokens:
        assert torch.equal(_prompt_embeds(theirs, f"a photo of a {token}"), _prompt_embeds(ours, f"a photo of a {token}"))


# -- issue 33 (item 3): a header declaring a huge tensor is refused before any data is read ----------------
@pytest.mark.parametrize("log2", [29, 31])
@pytest.mark.parametrize("layout", ["dafusion-aug", "diffusers", "a1111", "sdxl"])
def test_a_token_file_declaring_a_huge_tensor_is_refused_unread(tmp_path, monkeypatch, layout, log2):
    """A 1 x 2**29 float32 tensor in a sparse file took 14-78 s and 8 GB of memory to load; 1 x 2**31 died with
    a bare MemoryError. An embedding is kilobytes: the header's shapes are checked before anything is read."""
    from test_io import forbid_tensor_reads, write_sparse_safetensors

    huge = ("F32", (1, 2**log2))
    name, tensors, meta = {
        "dafusion-aug": ("<cat>", {"<cat>": huge}, {"tokens": '["<cat>"]', "class_names": '["cat"]', "dim": "32"}),
        "diffusers": ("<cat>", {"<cat>": huge}, None),
        "a1111": ("emb_params", {"emb_params": huge}, None),
        "sdxl": ("clip_g", {"clip_l": ("F32", (1, 32)), "clip_g": huge},
                 {"tokens": '["<cat>"]', "family": "sdxl", "dim": "32", "dim_2": "64"}),
    }[layout]
    path = write_sparse_safetensors(tmp_path / "t.safetensors", tensors, meta)
    forbid_tensor_reads(monkeypatch)
    want = {"dafusion-aug": "the dim the file declares, 32", "sdxl": "the dim the file declares, 64"}.get(layout, "at most 4096")
    match = rf"token file '{path}' declares tensor '{name}' of shape \(1, {2**log2}\) F32 .*{want}.*refused before reading"
    with pytest.raises(TokenFileError, match=match):
        ClassTokens.load(path)
    if layout == "a1111":
        with pytest.raises(TokenFileError, match=match.replace("token file", "A1111 embedding")):
            ClassTokens.from_a1111(path)


@pytest.mark.parametrize(
    "tensors, meta, match",
    [
        ({"<cat>": ("F32", (1, 64))}, {"dim": "32"}, r"'<cat>' of shape \(1, 64\) F32 \(256 B\): an embedding's width \(its "
                                                      r"last dimension\) must be the dim the file declares, 32, got 64"),
        ({"<cat>": ("F32", (2000, 32))}, {"dim": "32"}, r"'<cat>' of shape \(2000, 32\) .*: it may have at most 1,024 rows "
                                                        r"\(1024 vectors per token\), got 2,000"),
        ({"<cat>": ("F32", (1, 1, 32))}, {}, r"'<cat>' of shape \(1, 1, 32\) .*: its number of dimensions must be one of \[1, 2\], got 3"),
        ({f"<c{i}>": ("F32", (1024, 4096)) for i in range(80)}, {"dim": "4096"},
         r"declares 80 tensors of 1.2 GiB in all \(the largest '<c0>' of shape \(1024, 4096\) F32 \(16.0 MiB\)\), over the limit of 1.0 GiB"),
        ({"<cat>": ("F32", (1, 32))}, {"dim": "wide"}, r"'dim' must be a positive integer, got 'wide'"),
    ],
    ids=["other-dim", "too-many-vectors", "rank-3", "too-large-in-all", "malformed-dim"],
)
def test_token_file_headers_are_checked_against_the_declared_dim_and_sane_sizes(tmp_path, monkeypatch, tensors, meta, match):
    """Before, a [1, 64] tensor in a file declaring dim=32 loaded (and failed when applied), 2000 vectors per
    token loaded, and a 1 GiB file of embeddings was read whole."""
    from test_io import forbid_tensor_reads, write_sparse_safetensors

    tokens = json.dumps(list(tensors))
    path = write_sparse_safetensors(tmp_path / "t.safetensors", tensors, {"tokens": tokens, "class_names": tokens, **meta})
    forbid_tensor_reads(monkeypatch)
    with pytest.raises(TokenFileError, match=match):
        ClassTokens.load(path)


@pytest.mark.parametrize("importer", ["from_dafusion", "from_a1111"])
def test_a_huge_pt_token_file_is_refused_unread(tmp_path, monkeypatch, importer):
    """The .pt / .bin importers went straight to torch.load, which reads every storage into memory."""
    from test_io import forbid_tensor_reads

    path = tmp_path / "tokens.pt"
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04")
        f.truncate(2**31)  # a sparse 2 GiB file
    forbid_tensor_reads(monkeypatch)
    with pytest.raises(TokenFileError, match=r"tokens.pt' is 2.0 GiB, more than the 1.0 GiB a token file may take .* refused unread"):
        getattr(ClassTokens, importer)(path)
