-- wrk script: POST /appointments (the server makes each id) at any number of connections, counting
-- what came back, for the overload section of bench/bench.py and tests/test_overload.py:
--   wrk -t2 -c4000 -d5s --timeout 10s -s bench/bench_overload.lua http://127.0.0.1:8000/appointments
-- wrk resends at once whatever it got, Retry-After included: the worst client there is.
-- At the end, one line "RESULT {json}": bench_report.lua's fields (latencies in
-- microseconds, over every answer, 503s included) and, summed over the threads,
--   ok            answers 2xx
--   shed          answers 503
--   no_retry      503s without a Retry-After header
--   no_id         answers without an X-Request-ID header
--   closed        answers that closed the connection (Connection: close): a client must reconnect
--   other         any other status
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"physician_id": "ea959b03-5577-45c9-b9f7-a45d3e77ce82", "patient_id": "86158d46-ce33-4e3d-9822-462bbff5782e"}'

local threads = {}
local COUNTS = { "ok", "shed", "no_retry", "no_id", "closed", "other" }

function setup(thread)
    table.insert(threads, thread)
end

function init(args)
    ok, shed, no_retry, no_id, closed, other = 0, 0, 0, 0, 0, 0
end

local function header(headers, name)
    return headers[name] or headers[name:lower()]
end

function response(status, headers, body)
    if status >= 200 and status < 300 then
        ok = ok + 1
    elseif status == 503 then
        shed = shed + 1
        if header(headers, "Retry-After") == nil then
            no_retry = no_retry + 1
        end
    else
        other = other + 1
    end
    if header(headers, "X-Request-ID") == nil and header(headers, "X-Request-Id") == nil then
        no_id = no_id + 1
    end
    local connection = header(headers, "Connection")
    if connection ~= nil and connection:lower() == "close" then
        closed = closed + 1
    end
end

function extra_report()
    local sums = {}
    for _, name in ipairs(COUNTS) do
        sums[name] = 0
        for _, thread in ipairs(threads) do
            sums[name] = sums[name] + thread:get(name)
        end
    end
    return sums
end

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "bench_report.lua")
