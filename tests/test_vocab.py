import tensorflow as tf

from model.text.vocab import (
    END_ID,
    PAD_ID,
    RESERVED,
    START_ID,
    UNK_ID,
    Vocabulary,
    standardize,
    tf_standardize,
    tokenize,
)


def test_standardize_strips_punctuation_and_case():
    assert standardize("A Dog, running!  On the BEACH...") == "a dog running on the beach"
    assert tokenize("kid's (red) kite;\tflying-high") == [
        "kid",
        "s",
        "red",
        "kite",
        "flying",
        "high",
    ]
    assert not any(c in standardize("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") for c in ".,!?;")


def test_build_orders_by_frequency_then_alphabet():
    caps = ["b a c", "a b", "a", "d c"]
    vocab = Vocabulary.build(caps, size=7)
    assert vocab.tokens[: len(RESERVED)] == RESERVED
    assert (PAD_ID, UNK_ID, START_ID, END_ID) == (0, 1, 2, 3)
    # a:3, b:2, c:2 (tie -> alphabetical), d:1 cut by size.
    assert vocab.tokens[4:] == ("a", "b", "c")


def test_encode_decode_round_trip_and_unknowns(tmp_path):
    vocab = Vocabulary.build(["a red circle", "a blue square"], size=20)
    ids = vocab.encode("A red TRIANGLE.")
    assert ids[0] == START_ID and ids[-1] == END_ID and ids[3] == UNK_ID
    assert vocab.decode(ids) == "a red <unk>"
    assert vocab.decode([vocab.index["red"], END_ID, vocab.index["blue"]]) == "red"
    path = tmp_path / "vocab.txt"
    vocab.save(str(path))
    assert path.read_text().splitlines()[:4] == list(RESERVED)
    assert Vocabulary.load(str(path)) == vocab


# The Python tokeniser and its TensorFlow twin (tf.data), byte for byte.


def test_tf_and_python_tokenisers_split_unicode_text_alike():
    """The TF pipeline's own split (not a Python re-split of its output) against `tokenize`."""
    from model.text.vocab import WHITESPACE

    assert "".join(chr(c) for c in range(0x110000) if chr(c).isspace()) == WHITESPACE
    texts = [
        "a\u00a0dog on a\u2009skateboard",
        "東京\u3000タワー",
        "line\u2028sep\u2029para\x85next\x1cfs",
        "\ttabs\nand\r\nnewlines\x0bvt\x0cff",
        "\u202fnarrow\u205fmath\u1680ogham\u200aHAIR ",
        "ÉCOLE, été... x--y",
        "\u00a0\u3000",
    ]
    got = tf.strings.split(tf_standardize(tf.constant(texts))).to_list()
    assert [[w.decode() for w in row] for row in got] == [tokenize(t) for t in texts]
    assert tokenize(texts[0]) == ["a", "dog", "on", "a", "skateboard"]


def test_tf_standardize_matches_python():
    texts = ["A Dog, running!", "  kid's (red)\tkite;  ", "ÉCOLE, été...", "x--y__z", "UPPER lower"]
    got = [b.decode() for b in tf_standardize(tf.constant(texts)).numpy()]
    assert [" ".join(g.split()) for g in got] == [standardize(t) for t in texts]


def test_lookups_use_one_index_built_once():
    """Encoding COCO's 414,000 references (the reward's document frequencies) looks up
    every word: the token -> id index is built once per vocabulary, not per caption."""
    vocab = Vocabulary.build([f"w{i} w{i}" for i in range(5000)], size=5004)
    assert vocab.index is vocab.index
    assert vocab.encode("w7 nowhere", add_markers=False) == [vocab.index["w7"], UNK_ID]
