"""Tests of optimlab.monitor (a package so that test module names cannot clash with other folders)."""
