"""Access control (SPEC §1): authentication, roles, API keys, organization scope, settings."""

from __future__ import annotations

from sqlalchemy import select


def test_health_and_ready(client):
    assert client.get("/health").json()["status"] == "ok"
    r = client.get("/ready")
    assert r.status_code == 200
    assert r.json()["revision"] == "0001"


def test_no_credentials_is_401_with_error_format(client):
    r = client.get("/api/v1/me")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"


def test_invalid_and_revoked_keys_are_401(org):
    r = org.client.get("/api/v1/me", headers={"Authorization": "Bearer dc_nope"})
    assert r.status_code == 401
    created = org.post("/api/v1/api-keys", json={"name": "temp", "role": "viewer"})
    assert created.status_code == 201
    key = created.json()["key"]
    assert key.startswith("dc_")
    assert org.client.get("/api/v1/me", headers={"Authorization": f"Bearer {key}"}).json()["role"] == "viewer"
    # the key is never shown again
    listed = org.get("/api/v1/api-keys").json()
    assert all("key" not in k for k in listed)
    assert org.post(f"/api/v1/api-keys/{created.json()['id']}/revoke").json()["revoked_at"] is not None
    assert org.client.get("/api/v1/me", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_login_with_password_sets_session_cookie(org, client):
    bad = client.post("/api/v1/auth/login", json={"email": org.admin_email, "password": "wrong password"})
    assert bad.status_code == 401
    ok = client.post("/api/v1/auth/login", json={"email": org.admin_email, "password": org.admin_password})
    assert ok.status_code == 200
    me = client.get("/api/v1/me")
    assert me.status_code == 200 and me.json()["role"] == "admin" and me.json()["actor"] == org.admin_email
    client.post("/api/v1/auth/logout")
    client.cookies.clear()
    assert client.get("/api/v1/me").status_code == 401


def test_logout_ends_every_session_of_the_user_even_a_copied_cookie(org, client):
    def login() -> str:
        client.cookies.clear()
        r = client.post("/api/v1/auth/login", json={"email": org.admin_email, "password": org.admin_password})
        assert r.status_code == 200
        return client.cookies["duecourse_session"]

    def with_cookie(cookie: str, method: str, path: str) -> int:
        client.cookies.clear()
        client.cookies.set("duecourse_session", cookie)
        return client.request(method, path).status_code

    laptop, phone = login(), login()
    assert [with_cookie(c, "GET", "/api/v1/me") for c in (laptop, phone)] == [200, 200]
    # Logging out on the laptop: the cookie it held (say, copied by someone) and the phone's session
    # no longer open anything; a new login does.
    assert with_cookie(laptop, "POST", "/api/v1/auth/logout") == 204
    assert [with_cookie(c, "GET", "/api/v1/me") for c in (laptop, phone)] == [401, 401]
    # A stale cookie's logout changes nothing: the new session survives it.
    fresh = login()
    assert with_cookie(laptop, "POST", "/api/v1/auth/logout") == 204
    assert with_cookie(fresh, "GET", "/api/v1/me") == 200


def test_a_browser_session_changes_nothing_from_another_sites_page(org, client):
    """The session cookie goes along with any request a page makes, whatever site the page is on;
    the API's JSON and body-less calls carry no CSRF token, so a cookie-authenticated change must
    come from duecourse's own pages (Origin / Sec-Fetch-Site). API keys are not ambient: not checked."""
    assert client.post("/api/v1/auth/login", json={"email": org.admin_email, "password": org.admin_password}).status_code == 200

    def pause(headers: dict[str, str]):  # type: ignore[no-untyped-def]
        return client.post("/api/v1/engine/pause", headers=headers)

    def paused() -> bool:
        return org.get("/api/v1/settings").json()["automation"]["engine_paused"]

    for foreign in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://testserver", "Sec-Fetch-Site": "cross-site"},
                    {"Origin": "http://testserver.evil.example"}):
        r = pause(foreign)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", foreign
        assert "Cross-site request refused" in r.json()["error"]["message"]
        assert paused() is False
    # Reading is not a change; the app's own pages (and a program without a page) may change.
    assert client.get("/api/v1/me", headers={"Origin": "https://evil.example"}).status_code == 200
    assert pause({"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}).status_code == 200 and paused()
    assert client.post("/api/v1/engine/resume").status_code == 200 and not paused()
    # Behind a proxy that rewrites the host, the browser's own word (Sec-Fetch-Site) decides.
    assert pause({"Origin": "https://collect.example.com", "Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert client.post("/api/v1/engine/resume").status_code == 200 and not paused()
    # Nor may another site's page log the user out (which ends their sessions everywhere).
    r = client.post("/api/v1/auth/logout", headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403 and client.get("/api/v1/me").status_code == 200
    # An API key is sent by a program on purpose, never by a browser on its own.
    client.cookies.clear()
    r = client.post("/api/v1/engine/pause", headers={**org.headers(), "Origin": "https://evil.example"})
    assert r.status_code == 200 and paused()


def test_roles_are_enforced(org):
    assert org.get("/api/v1/users", role="viewer").status_code == 403
    assert org.get("/api/v1/users", role="manager").status_code == 403
    assert org.get("/api/v1/users", role="admin").status_code == 200
    r = org.patch("/api/v1/settings", role="manager", json={"automation": {"auto_enqueue": True}})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    assert org.get("/api/v1/settings", role="viewer").json()["automation"]["auto_enqueue"] is False


def test_users_are_scoped_to_their_organization(org, other_org):
    u = org.post("/api/v1/users", json={"email": "agent@example.com", "password": "longenough", "role": "agent"})
    assert u.status_code == 201
    uid = u.json()["id"]
    assert other_org.get(f"/api/v1/users/{uid}").status_code == 404
    assert other_org.patch(f"/api/v1/users/{uid}", json={"role": "admin"}).status_code == 404
    assert other_org.delete(f"/api/v1/users/{uid}").status_code == 404
    assert org.get(f"/api/v1/users/{uid}").json()["email"] == "agent@example.com"
    assert all(x["id"] != uid for x in other_org.get("/api/v1/users").json())


def test_nobody_demotes_or_deactivates_themselves_and_role_changes_are_audited(org, client):
    agent = org.post("/api/v1/users", json={"email": "a2@example.com", "password": "longenough", "role": "agent"}).json()
    assert client.post("/api/v1/auth/login", json={"email": org.admin_email, "password": org.admin_password}).status_code == 200
    me = next(u for u in client.get("/api/v1/users").json() if u["email"] == org.admin_email)
    for body, field in (({"role": "viewer"}, "role"), ({"active": False}, "active")):
        r = client.patch(f"/api/v1/users/{me['id']}", json=body)
        assert r.status_code == 422 and [f["field"] for f in r.json()["error"]["fields"]] == [field]
    assert client.patch(f"/api/v1/users/{me['id']}", json={"name": "Boss"}).json()["name"] == "Boss"
    r = client.patch(f"/api/v1/users/{agent['id']}", json={"role": "manager", "active": False})
    assert r.status_code == 200 and (r.json()["role"], r.json()["active"]) == ("manager", False)
    audit = client.get("/api/v1/audit-log").json()["items"]
    changed = {(e["field"], e["old_value"], e["new_value"]) for e in audit if e["entity_type"] == "user"}
    assert {("role", "agent", "manager"), ("active", "True", "False")} <= changed
    client.cookies.clear()
    assert org.get(f"/api/v1/users/{me['id']}").json()["role"] == "admin"


def test_an_inactive_admin_can_be_deleted_but_never_the_last_active_one(org, db):
    from duecourse.tenancy.models import User

    old = org.post("/api/v1/users", json={"email": "old@example.com", "password": "longenough", "role": "admin"}).json()
    assert org.patch(f"/api/v1/users/{old['id']}", json={"active": False}).status_code == 200
    # Deleting an inactive admin leaves the active admins as they are.
    assert org.delete(f"/api/v1/users/{old['id']}").status_code == 204
    with db.transaction() as s:
        (only,) = s.scalars(select(User).where(User.organization_id == org.id, User.role == "admin")).all()
        only_id = only.id
    r = org.delete(f"/api/v1/users/{only_id}")
    assert r.status_code == 422 and "last admin" in r.text


def test_a_new_password_ends_the_sessions_opened_with_the_old_one(org, client):
    assert client.post("/api/v1/auth/login", json={"email": org.admin_email, "password": org.admin_password}).status_code == 200
    me = next(u for u in client.get("/api/v1/users").json() if u["email"] == org.admin_email)
    stolen = dict(client.cookies)  # a copy of the session cookie, as someone else might hold it
    assert client.patch(f"/api/v1/users/{me['id']}", json={"password": "a-new-long-password"}).status_code == 200
    client.cookies.clear()
    client.cookies.update(stolen)
    assert client.get("/api/v1/me").status_code == 401
    client.cookies.clear()
    assert client.post("/api/v1/auth/login", json={"email": org.admin_email, "password": org.admin_password}).status_code == 401
    assert client.post("/api/v1/auth/login", json={"email": org.admin_email, "password": "a-new-long-password"}).status_code == 200
    assert client.get("/api/v1/me").status_code == 200


def test_user_validation(org):
    r = org.post("/api/v1/users", json={"email": "not-an-email", "password": "short", "role": "boss"})
    assert r.status_code == 422
    fields = {f["field"] for f in r.json()["error"]["fields"]}
    assert {"email", "password", "role"} <= fields
    ok = org.post("/api/v1/users", json={"email": "dup@example.com", "password": "longenough", "role": "agent"})
    assert ok.status_code == 201
    dup = org.post("/api/v1/users", json={"email": "DUP@example.com", "password": "longenough", "role": "agent"})
    assert dup.status_code == 409


def test_settings_defaults_update_validation_and_audit(org):
    s = org.get("/api/v1/settings").json()
    assert s["automation"]["scheduler_interval_minutes"] == 5
    assert s["dispatch"]["frequency_limits"]["overall"]["per_day"] == 1
    assert s["dispatch"]["frequency_limits"]["voice"]["per_week"] == 7
    assert s["dispatch"]["allowed_hours"]["sms"] == {"start": "08:00", "end": "20:00", "days": ["mon", "tue", "wed", "thu", "fri", "sat"]}
    assert s["dispatch"]["allowed_hours"]["voice"]["end"] == "21:00"
    assert s["outcomes"]["promise_grace_days"] == 1 and s["outcomes"]["callback_expiry_hours"] == 24

    bad = org.patch("/api/v1/settings", json={"dispatch": {"allowed_hours": {"sms": {"start": "25:00"}}}})
    assert bad.status_code == 422
    assert any("allowed_hours.sms.start" in f["field"] for f in bad.json()["error"]["fields"])
    unknown = org.patch("/api/v1/settings", json={"automation": {"auto_enqueu": True}})
    assert unknown.status_code == 422
    assert org.get("/api/v1/settings").json() == s  # nothing changed

    ok = org.patch("/api/v1/settings", json={"automation": {"auto_enqueue": True, "scheduler_interval_minutes": 10}})
    assert ok.status_code == 200
    assert ok.json()["automation"]["auto_enqueue"] is True
    assert ok.json()["dispatch"] == s["dispatch"]


def test_settings_changes_are_in_the_audit_log(org, other_org):
    org.patch("/api/v1/settings", json={"exclusions": {"min_balance": "25.50", "excluded_tags": ["legal"]}})
    entries = org.get("/api/v1/audit-log", params={"entity_type": "settings"}).json()["items"]
    by_field = {e["field"]: e for e in entries}
    assert by_field["exclusions.min_balance"]["old_value"] == "0"
    assert by_field["exclusions.min_balance"]["new_value"] == "25.50"
    assert by_field["exclusions.excluded_tags"]["new_value"] == '["legal"]'
    assert {e["actor"] for e in entries} == {"api-key:admin key"}
    # Only the changed fields are recorded, and another organization sees none of it.
    assert len(entries) == 2
    assert other_org.get("/api/v1/audit-log").json()["items"] == []
