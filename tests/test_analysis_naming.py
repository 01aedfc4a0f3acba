"""Concept naming (paper.md §8.9): a user vocabulary file at the joint embedding, and data-based names
(top-activating classes and domains) for intermediate-layer SAEs."""
import numpy as np
import pytest
import torch

from clipmech.analysis.sharing import embed_words, name_latents, name_latents_by_data, read_vocabulary
from clipmech.models import HookedCLIP


def test_vocabulary_file_names_latents_with_the_models_text_tower(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("dog\n\ncat\ndog\n  tree  \n")
    words = read_vocabulary(path)
    assert words == ["dog", "cat", "tree"]
    model = HookedCLIP.from_config("tiny-rn").eval()
    emb = embed_words(model, words)
    # a decoder whose rows are the word embeddings themselves names each latent by its own word
    names = name_latents(emb[[2, 0, 1]], emb, words)
    assert [n["word"] for n in names] == ["tree", "dog", "cat"] and names[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no words"):
        read_vocabulary(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="one word per line"):
        read_vocabulary(tmp_path / "nope.txt")


def test_intermediate_latents_named_by_top_classes_and_domains():
    class_idx = np.array([0, 0, 1, 1, 2, 2])
    domain_idx = np.array([0, 1, 0, 1, 0, 1])
    codes = torch.tensor([[5.0, 0.0], [3.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 6.0]])
    names = name_latents_by_data(codes, class_idx, domain_idx, ["cat", "dog", "tree"], ["real", "sketch"], top=2)
    assert names[0] == {"latent": 0, "classes": ["cat", "dog"], "domains": ["real", "sketch"], "mean_activation": 4.0}
    assert names[1]["classes"] == ["tree", "dog"] and names[1]["domains"] == ["sketch", "real"]
    with pytest.raises(ValueError, match="rows"):
        name_latents_by_data(codes[:3], class_idx, domain_idx, ["cat", "dog", "tree"], ["real", "sketch"])
