"""Users, groups and SSH authorized keys.

    users.user(name, groups=(), shell=None, home=None, system=False, uid=None,
               create_home=True, authorized_keys=None, state="present")
    users.group(name, gid=None, system=False, state="present")

groups are supplementary groups the user must be IN: missing ones are added
(`usermod --append`), others are never removed (removing an admin from `sudo` because a list
was incomplete is a lockout). shell/home None = not managed. A different uid/gid on an
existing user/group is refused (PlanError): renumbering orphans files.

authorized_keys None = not managed; a list = the file holds exactly these keys
(~/.ssh 0700 and ~/.ssh/authorized_keys 0600, owned by the user).
state="absent" removes the user (`userdel`, home kept) or the group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from provisioner.change import Change, Noop
from provisioner.facts import Facts, FileFact
from provisioner.ops import _base as b
from provisioner.templating import Rendered


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    shell: str | None = None
    home: str | None = None
    system: bool = False
    uid: int | None = None
    create_home: bool = True
    authorized_keys: tuple[str, ...] | None = None
    state: str = "present"

    @property
    def id(self) -> str:
        return f"user {self.name}"

    def facts(self) -> dict:
        return {"users": [self.name], "groups": [self.name]}

    def _home(self, u: dict | None) -> str:
        return self.home or (u or {}).get("home") or f"/home/{self.name}"

    def _keys_text(self) -> str:
        return "".join(k + "\n" for k in self.authorized_keys or ())

    def plan(self, facts: Facts) -> list[Change | Noop]:
        u = facts.user(self.name)
        if self.state == "absent":
            if u is None:
                return [Noop(self.id, "already absent")]
            return [Change(self.id, "remove", f"exists (uid {u['uid']})",
                           (b.run(["userdel", "--", self.name]),))]
        out: list[Change | Noop] = []
        if u is None:
            argv = ["useradd"]
            if self.system:
                argv.append("--system")
            if self.uid is not None:
                argv += ["--uid", str(self.uid)]
            if self.home:
                argv += ["--home-dir", self.home]
            argv.append("--create-home" if self.create_home else "--no-create-home")
            if self.shell:
                argv += ["--shell", self.shell]
            if self.groups:
                argv += ["--groups", ",".join(self.groups)]
            # A group of the user's name that exists (or an earlier resource creates) becomes
            # the primary group: useradd --user-group refuses to reuse it.
            if facts.group(self.name) is not None:
                argv += ["--gid", self.name, "--", self.name]
            else:
                argv += ["--user-group", "--", self.name]
            out.append(Change(self.id, "create", "absent", (b.run(argv),)))
        else:
            if self.uid is not None and u["uid"] != self.uid:
                raise b.PlanError(f"user {self.name} has uid {u['uid']}, not {self.uid}; "
                                  "refusing to renumber it")
            argv, why = ["usermod"], []
            if self.shell and u["shell"] != self.shell:
                argv += ["--shell", self.shell]
                why.append(f"shell {u['shell']} != {self.shell}")
            if self.home and u["home"] != self.home:
                argv += ["--home", self.home]
                why.append(f"home {u['home']} != {self.home}")
            have = set(u.get("groups") or ()) | {u.get("group")}
            missing = [g for g in self.groups if g not in have]
            if missing:
                argv += ["--append", "--groups", ",".join(missing)]
                why.append("not in group(s) " + ", ".join(missing))
            if why:
                out.append(Change(self.id, "modify", "; ".join(why),
                                  (b.run(argv + ["--", self.name]),)))
        if self.authorized_keys is not None:
            out += self._plan_keys(u)
        if not any(isinstance(c, Change) for c in out):
            detail = [f"uid {u['uid']}", f"shell {u['shell']}"]
            if self.groups:
                detail.append("groups " + ",".join(self.groups))
            if self.authorized_keys is not None:
                detail.append(f"{len(self.authorized_keys)} authorized key(s)")
            return [Noop(self.id, "up to date: " + ", ".join(detail))]
        return out

    def _plan_keys(self, u: dict | None) -> list[Change]:
        home = self._home(u)
        same_home = u is not None and u.get("home") == home
        sdir = FileFact.from_json(f"{home}/.ssh", u.get("ssh_dir") if same_home else None)
        akf = FileFact.from_json(f"{home}/.ssh/authorized_keys",
                                 u.get("authorized_keys") if same_home else None)
        group = (u or {}).get("group")
        text = self._keys_text()
        why, steps = [], []
        if not sdir.exists:
            why.append(f"{sdir.path} absent")
        elif sdir.type != "dir":
            raise b.PlanError(f"{sdir.path} is {sdir.describe()}, not a directory")
        else:
            why += [f"{sdir.path} {d}" for d in b.drift(sdir, "0700", self.name, None)]
        if why:
            steps.append(b.directory(sdir.path, "0700", self.name, group))
        diff = None
        if not akf.exists or akf.type != "file" or akf.sha256 != b.sha256(text):
            why.append("authorized_keys " + ("absent" if not akf.exists else "differ"))
            steps.append(b.write(akf.path, text, "0600", self.name, group))
            diff = b.file_diff(akf.path, akf, Rendered.plain(text))
        else:
            d = b.drift(akf, "0600", self.name, None)
            if d:
                why += [f"authorized_keys {x}" for x in d]
                steps.append(b.attrs(akf.path, "0600", self.name, None))
        if not steps:
            return []
        return [Change(self.id, "authorized_keys", "; ".join(why), tuple(steps), diff)]

    def expect(self, facts: Facts) -> dict:
        u = facts.user(self.name)
        if self.state == "absent":
            return {"users": {self.name: None}}
        home = self._home(u)
        new = {
            "uid": (u or {}).get("uid", self.uid), "gid": (u or {}).get("gid"),
            "group": (u or {}).get("group", self.name), "home": home,
            "shell": self.shell or (u or {}).get("shell") or "/bin/sh",
            "groups": sorted(set((u or {}).get("groups") or ()) | set(self.groups)),
            "ssh_dir": (u or {}).get("ssh_dir") or {"exists": False},
            "authorized_keys": (u or {}).get("authorized_keys") or {"exists": False},
        }
        if self.authorized_keys is not None:
            new["ssh_dir"] = {"exists": True, "type": "dir", "mode": "0700", "owner": self.name,
                              "group": new["group"]}
            new["authorized_keys"] = b.file_fact("", self._keys_text(), "0600", self.name,
                                                 new["group"], None)
        frag: dict = {"users": {self.name: {"__replace__": True, **new}}}
        if u is None and facts.group(self.name) is None:
            frag["groups"] = {self.name: {"gid": None, "members": []}}   # --user-group
        return frag


def user(name: str, groups: Sequence[str] | str = (), *, shell: str | None = None,
         home: str | None = None, system: bool = False, uid: int | None = None,
         create_home: bool = True, authorized_keys: Sequence[str] | None = None,
         state: str = "present") -> User:
    if state not in ("present", "absent"):
        raise ValueError(f"state must be present or absent, not {state!r}")
    if shell is not None:
        b.abs_path(shell)
    if home is not None:
        b.abs_path(home)
    if uid is not None and (not isinstance(uid, int) or uid < 0):
        raise ValueError(f"bad uid {uid!r}")
    keys = None
    if authorized_keys is not None:
        if isinstance(authorized_keys, str):
            authorized_keys = [authorized_keys]
        keys = tuple(k.strip() for k in authorized_keys)
        for k in keys:
            if not k or "\n" in k or "\r" in k or "\0" in k or k.startswith("#"):
                raise ValueError(f"bad authorized key {k[:40]!r}")
    return User(name=b.check_name(name, "user"), groups=b.names(groups, "group"), shell=shell,
                home=home, system=system, uid=uid, create_home=create_home,
                authorized_keys=keys, state=state)


@dataclass(frozen=True)
class Group:
    name: str
    gid: int | None = None
    system: bool = False
    state: str = "present"

    @property
    def id(self) -> str:
        return f"group {self.name}"

    def facts(self) -> dict:
        return {"groups": [self.name]}

    def plan(self, facts: Facts) -> list[Change | Noop]:
        g = facts.group(self.name)
        if self.state == "absent":
            if g is None:
                return [Noop(self.id, "already absent")]
            return [Change(self.id, "remove", f"exists (gid {g['gid']})",
                           (b.run(["groupdel", "--", self.name]),))]
        if g is None:
            argv = ["groupadd"] + (["--system"] if self.system else [])
            if self.gid is not None:
                argv += ["--gid", str(self.gid)]
            return [Change(self.id, "create", "absent", (b.run(argv + ["--", self.name]),))]
        if self.gid is not None and g["gid"] != self.gid:
            raise b.PlanError(f"group {self.name} has gid {g['gid']}, not {self.gid}; "
                              "refusing to renumber it")
        return [Noop(self.id, f"exists (gid {g['gid']})")]

    def expect(self, facts: Facts) -> dict:
        if self.state == "absent":
            return {"groups": {self.name: None}}
        g = facts.group(self.name)
        return {"groups": {self.name: g or {"gid": self.gid, "members": []}}}


def group(name: str, *, gid: int | None = None, system: bool = False,
          state: str = "present") -> Group:
    if state not in ("present", "absent"):
        raise ValueError(f"state must be present or absent, not {state!r}")
    if gid is not None and (not isinstance(gid, int) or gid < 0):
        raise ValueError(f"bad gid {gid!r}")
    return Group(name=b.check_name(name, "group"), gid=gid, system=system, state=state)
