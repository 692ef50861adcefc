"""The operating system's contracts: sockets, systemd notify, cgroups, /proc."""
