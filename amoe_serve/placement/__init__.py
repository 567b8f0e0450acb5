"""Expert placement: routing traces, placement policies and their evaluation."""
