from model.vocab import (
    END_ID,
    PAD_ID,
    RESERVED,
    START_ID,
    UNK_ID,
    Vocabulary,
    standardize,
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
