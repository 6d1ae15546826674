"""Tests of the sandbox (the local reference gateway), over real HTTP on loopback."""
