-- haconfd's hold action for HAProxy (2.6+, built with Lua): keeps a new connection waiting while
-- a backend has no usable server, instead of closing it at once. During a switchover haconfd
-- drains the old primary before the new one takes writes; with this action a client connecting
-- in that gap is handed to the new primary a few milliseconds after haconfd moves HAProxy to it.
--
--   global
--       lua-load /etc/haproxy/hold.lua
--   listen primary
--       tcp-request inspect-delay 11s              # longer than <max_ms>
--       tcp-request content lua.haconfd_hold primary 10000 10
--
-- Arguments: the backend, the longest wait in milliseconds, the polling step in milliseconds.
-- A client that goes away while waiting is released at once. `timeout client` must be longer
-- than the longest wait.
local function now_ms()
    local t = core.now()
    return t.sec * 1000 + t.usec / 1000
end

core.register_action("haconfd_hold", { "tcp-req" }, function(txn, backend, max_ms, step_ms)
    max_ms = tonumber(max_ms) or 10000
    step_ms = tonumber(step_ms) or 10
    local start = now_ms()
    while txn.f:nbsrv(backend) == 0 do
        if now_ms() - start >= max_ms then
            break
        end
        if not txn.req:may_recv() then
            break
        end
        core.msleep(step_ms)
    end
    txn:set_var("txn.haconfd_held_ms", math.floor(now_ms() - start))
end, 3)
