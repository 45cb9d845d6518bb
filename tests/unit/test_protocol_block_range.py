"""The one notation of block ranges shown to people: A:B, half-open, as --blocks takes it."""

from homeswarm.protocol.block_range import block_range, block_ranges


def test_a_span_reads_as_blocks_takes_it():
    assert block_range(0, 4) == "0:4" and block_range(3, 4) == "3:4"


def test_a_set_of_blocks_reads_as_its_runs():
    assert block_ranges([8, 0, 1, 2, 5, 7, 2]) == "0:3, 5:6, 7:9"
    assert block_ranges([]) == ""
