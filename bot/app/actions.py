"""What a member asks for and who is asking: the words the front ends and the app share (a
button's `Action`, the `Actor`, what a submit returns, what /info shows, and `UserError`, the
refusal whose message is shown as is)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from bot.app.access import AdminScope, may_manage
from bot.core.models import ActiveJob, Balance, Job, Owner
from bot.core.preferences import Preferences
from bot.core.taste import Profile


class UserError(Exception):
    """A refusal or mistake whose message is written for the user and shown as is."""


class Action(StrEnum):
    """What a button asks for; the value is what its custom_id carries."""

    UPSCALE = "U"  # U1–U4 on a grid
    VARY = "V"  # V1–V4 on a grid
    REROLL = "R"  # 🔄 on a grid
    VARY_SUBTLE = "VS"  # on an upscaled image
    VARY_STRONG = "VX"  # on an upscaled image
    UPSCALE_AGAIN = "UP"  # "Upscale (2x)" on an upscaled image
    CANCEL = "X"  # while a job waits or runs
    # Under one image (a separated grid image, or an upscale's), with that image's index:
    UPSCALE_SUBTLE = "US"
    UPSCALE_CREATIVE = "UC"
    ZOOM_OUT_2 = "Z2"
    ZOOM_OUT_1_5 = "Z15"
    PAN_LEFT = "PL"
    PAN_RIGHT = "PR"
    PAN_UP = "PU"
    PAN_DOWN = "PD"
    MAKE_SQUARE = "SQ"
    # ✨ under a draft's images: that image at full quality (same seed and prompt).
    ENHANCE = "E"

    @property
    def needs_index(self) -> bool:
        return self in (Action.UPSCALE, Action.VARY, Action.ENHANCE)

    @property
    def takes_prompt(self) -> bool:
        """Remix mode: whether a press may come with an edited prompt."""
        return self in _REMIXABLE


_REMIXABLE = frozenset(
    {
        Action.VARY,
        Action.VARY_SUBTLE,
        Action.VARY_STRONG,
        Action.REROLL,
        Action.ZOOM_OUT_2,
        Action.ZOOM_OUT_1_5,
        Action.PAN_LEFT,
        Action.PAN_RIGHT,
        Action.PAN_UP,
        Action.PAN_DOWN,
    }
)


@dataclass(frozen=True)
class Actor:
    """Who is asking, as the front end knows them. `is_admin`: an admin here (bot/app/access.py);
    `is_owner`: one of the configured owners, whose rights reach every server."""

    user_id: int
    guild_id: int | None = None
    channel_id: int | None = None
    role_ids: tuple[int, ...] = ()
    is_admin: bool = False
    is_owner: bool = False

    @property
    def owner(self) -> Owner:
        return Owner(self.user_id, self.guild_id, self.channel_id, self.role_ids)

    @property
    def admin_scope(self) -> AdminScope:
        if self.is_owner:
            return AdminScope.OWNER
        return AdminScope.SERVER if self.is_admin else AdminScope.NONE

    def may_manage(self, owner: Owner) -> bool:
        """Whether this member may act on what `owner` made (press its buttons, cancel it,
        delete it): their own, or as an admin whose rights reach its server."""
        return owner.user_id == self.user_id or may_manage(
            self.admin_scope, self.guild_id, owner.guild_id
        )


@dataclass(frozen=True)
class MemberInfo:
    """What /info shows a member about themselves."""

    balance: Balance
    jobs: tuple[ActiveJob, ...]
    preferences: Preferences
    # One's taste profile (--p): share code and ratings.
    taste: Profile | None = None


@dataclass(frozen=True)
class Submitted:
    job: Job
    notes: tuple[str, ...] = ()
    position: int | None = None
