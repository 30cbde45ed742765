"""The join stage: enlisted machines become a Ceph cluster (issue 6; placement first)."""
