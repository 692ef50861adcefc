"""The master: forks, watches and replaces workers; never serves traffic."""
