"""The surgeons the families' build halves share: spec.py (what surgery reads from a config), surgeon.py (the
shared pieces and the two graph flavours as strategies), rcnn.py and dense.py (one surgeon per meta-architecture)."""
