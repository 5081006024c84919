"""cli - the `smtpgate` command and its subcommands."""
