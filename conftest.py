"""pytest's root: its folder goes first on sys.path, so tests import the project's modules
(`import protocol`, `import executor`, ...) however pytest is started."""
