"""Test infrastructure for multus-eni end-to-end tests.

Reusable pieces: network namespaces (``netns``), the moto EC2 emulator (``moto``),
a fault-injecting EC2 proxy (``fault_proxy``) and the sidecar process (``sidecar``).
"""
