"""Lab tests reuse the QEMU fixtures (kernel cache, availability)."""

from tests.vm.conftest import kernel_cache, qemu_available  # noqa: F401
