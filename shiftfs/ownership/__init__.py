"""Ownership: the policy interface and its table/xattr implementations, id maps, records,
names, ACLs and the view rule."""
