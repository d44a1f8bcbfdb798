"""What teams used, for GET /usage: GPU time and trained tokens in a window, by job and by UTC day,
counted from the attempts ledger, and the storage each team keeps now.

The rules of the count (README, "Usage"): an attempt's GPU time runs from its claim to its end, so a
pause (between two attempts) never counts, and a lost worker's attempt ends at its last heartbeat
(app/usage/ledger.py writes it so). An attempt still running counts up to now. Its time is split at
UTC midnights; its trained tokens count once, on the day it ended (a running one's so far: today).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy.orm import Session

from app.db import database_now
from app.errors import Forbidden, Invalid, field_errors
from app.teams import repository as teams
from app.teams.service import Caller, still_authenticated
from app.usage import repository
from app.usage.repository import AttemptSpan
from app.usage.schemas import MAX_JOBS_PER_TEAM, DayUsage, JobUsage, TeamUsage, UsageReport
from worker.training.spec import excerpt

MAX_WINDOW = timedelta(days=366)  # a leap year: any calendar year in one request, and the work per request bounded
ONE_DAY = timedelta(days=1)


@dataclass(frozen=True)
class Window:
    since: datetime  # included
    until: datetime  # excluded


def window(from_: str | None, to: str | None, now: datetime) -> Window:
    """[from, to) in UTC from the query's strings; by default the current UTC month up to now. A
    window that is empty, reversed or longer than MAX_WINDOW is refused, naming the field to change."""
    given_from, given_to = _instant("from", from_), _instant("to", to)
    since = given_from or repository.month_start(now)
    until = given_to or now
    if since >= until:
        at_fault = "to" if given_to else "from"
        raise Invalid(f"{at_fault}: from ({since.isoformat()}) must be before to ({until.isoformat()}); by default "
                      "from is the start of this month (UTC) and to is now",
                      details=field_errors([(at_fault, "from must be before to")]))
    if until - since > MAX_WINDOW:
        at_fault = "from" if given_from else "to"
        raise Invalid(f"{at_fault}: the window from {since.isoformat()} to {until.isoformat()} spans "
                      f"{(until - since) / ONE_DAY:.1f} days; ask for at most {MAX_WINDOW.days} days at once",
                      details=field_errors([(at_fault, f"at most {MAX_WINDOW.days} days between from and to")]))
    return Window(since, until)


def _instant(name: str, value: str | None) -> datetime | None:
    """An ISO 8601 date (its midnight) or datetime, in UTC unless it names its offset; blank: not given."""
    if value is None or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError:
        raise Invalid(f"{name}: {excerpt(value)} is out of range; give a date between years 1 and 9999",
                      details=field_errors([(name, "a date between years 1 and 9999")])) from None
    except ValueError:
        raise Invalid(f"{name}: {excerpt(value)} is not an ISO 8601 date or datetime; give e.g. 2025-05-01 or "
                      "2025-05-01T12:00:00Z (UTC unless it names its offset; in a URL, write + as %2B)",
                      details=field_errors([(name, "an ISO 8601 date or datetime, e.g. 2025-05-01")])) from None


def report(session: Session, caller: Caller, from_: str | None, to: str | None, all_teams: bool = False,
           now: datetime | None = None) -> UsageReport:
    """The caller's team's usage in the window; with all_teams (admin keys only), every team's."""
    if all_teams and not caller.is_admin:
        raise Forbidden("all_teams=true needs an admin key (qlora admin create-key TEAM --admin); "
                        "without it, /usage answers for your own team")
    if all_teams:
        # Every team's usage is an admin read: the key is read again, as for /admin/... (app.deps.get_admin), not
        # trusted from the key cache, where a revoked admin key kept reading it for QLORA_KEY_CACHE_S.
        still_authenticated(session, caller)
    now = now or database_now(session)  # the attempts' clock: a running one counts up to now
    span = window(from_, to, now)
    names = {team.id: team.name for team in teams.list_teams(session)} if all_teams else {caller.team_id: caller.team_name}
    scope = None if all_teams else [caller.team_id]
    tallies = {team_id: _TeamTally() for team_id in names}
    for attempt in repository.attempt_spans(session, span.since, span.until, now, scope):
        tallies.setdefault(attempt.team_id, _TeamTally()).add(attempt, span, now)
    stored = repository.storage_bytes_by_team(session, scope)
    used = [tally.usage(names.get(team_id, team_id), stored.get(team_id, 0)) for team_id, tally in tallies.items()]
    used.sort(key=lambda team: (-team.gpu_seconds, team.team))
    return UsageReport(from_=span.since, to=span.until, as_of=now, teams=used)


def day_pieces(attempt: AttemptSpan, span: Window, now: datetime) -> Iterator[tuple[date, float]]:
    """The attempt's GPU-seconds inside the window, split at UTC midnights."""
    start, end = max(attempt.claimed_at, span.since), min(attempt.ended_at or now, span.until)
    day = start.date()
    while (day_start := datetime.combine(day, time(), UTC)) < end:
        seconds = repository.overlap_s(attempt, max(span.since, day_start), min(span.until, day_start + ONE_DAY), now)
        if seconds > 0:
            yield day, seconds
        day += ONE_DAY


@dataclass
class _JobTally:
    name: str
    status: str
    gpu_seconds: float = 0.0
    trained_tokens: int = 0
    attempts: int = 0


@dataclass
class _TeamTally:
    jobs: dict[str, _JobTally] = field(default_factory=dict)
    day_seconds: dict[date, float] = field(default_factory=dict)
    day_tokens: dict[date, int] = field(default_factory=dict)

    def add(self, attempt: AttemptSpan, span: Window, now: datetime) -> None:
        job = self.jobs.setdefault(attempt.job_id, _JobTally(attempt.job_name, attempt.job_status))
        job.attempts += 1
        for day, seconds in day_pieces(attempt, span, now):
            job.gpu_seconds += seconds
            self.day_seconds[day] = self.day_seconds.get(day, 0.0) + seconds
        # Tokens count where the attempt ended; a running one's so far count now, in any window that
        # reaches now (the default one ends at now: its own end, excluded, must not leave them out).
        ended = attempt.ended_at or now
        if span.since <= ended < span.until or (attempt.ended_at is None and span.since <= now <= span.until):
            job.trained_tokens += attempt.tokens
            self.day_tokens[ended.date()] = self.day_tokens.get(ended.date(), 0) + attempt.tokens

    def usage(self, team: str, storage_bytes: int) -> TeamUsage:
        ranked = sorted(self.jobs.items(), key=lambda item: (-item[1].gpu_seconds, -item[1].trained_tokens, item[0]))
        gpu_seconds = sum(self.day_seconds.values())
        return TeamUsage(
            team=team, gpu_seconds=round(gpu_seconds, 3), gpu_hours=round(gpu_seconds / 3600, 4),
            trained_tokens=sum(self.day_tokens.values()), storage_bytes=storage_bytes,
            jobs=len(ranked), by_job_truncated=len(ranked) > MAX_JOBS_PER_TEAM,
            by_job=[JobUsage(job_id=job_id, name=job.name, status=job.status, gpu_seconds=round(job.gpu_seconds, 3),
                             trained_tokens=job.trained_tokens, attempts=job.attempts)
                    for job_id, job in ranked[:MAX_JOBS_PER_TEAM]],
            by_day=[DayUsage(date=day, gpu_seconds=round(self.day_seconds.get(day, 0.0), 3),
                             trained_tokens=self.day_tokens.get(day, 0))
                    for day in sorted(self.day_seconds.keys() | self.day_tokens.keys())])
