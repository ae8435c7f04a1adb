"""The quality benchmark's bookkeeping: which runs a continued run is compared with."""

from benchmarks.flickr8k import ancestors


def test_a_continued_run_is_compared_with_every_run_it_continues():
    bases = {"defaults": "", "scst3": "defaults", "scst5": "scst3", "other": ""}
    assert ancestors("scst5", bases) == ["scst3", "defaults"]
    assert ancestors("scst3", bases) == ["defaults"]
    assert ancestors("defaults", bases) == []
    # a base that is not a run of this benchmark ends the chain
    assert ancestors("late", {"late": "elsewhere"}) == []
