from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from balancekit.cli import status_table


class Command(BaseCommand):
    help = "Print balancekit's pools and backends (settings and database)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print status.json instead.")

    def handle(self, *args: Any, **options: Any) -> None:
        from balancekit_django.runtime import current

        runtime = current()
        runtime.refresh()  # the database's pools too
        if options["json"]:
            self.stdout.write(json.dumps(runtime.balancer.status(), indent=2))
        else:
            self.stdout.write(status_table(runtime.balancer))
