"""relay's bundled plugins, installed as the import package ``relay_plugins``.

Each module is one plugin, registered through the ``relay.plugins`` entry-point group exactly as a
third-party plugin is, and using only the public ``relay`` API.
"""
