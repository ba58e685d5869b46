-- wrk script for bench/bench.py, the soak of section 6 (which also makes section 3's backlog): a
-- fixed number of requests of one of two mixes, then each thread stops.
--   wrk -t2 -c16 -d3600s -s bench/bench_soak.lua -H 'Authorization: Bearer ...' URL -- ids.txt 2 10000 marker ends
-- Arguments: the id file, the number of threads (-t), the requests to send (all threads
-- together), the markers' prefix (bench.finish), the mix:
--   ends  every id of this thread's share ended once (POST /appointments/{id}/end; the worker is
--         not running, so each end leaves a pending charge), spread evenly over the thread's
--         quota; the other requests in turn GET /appointments/{id} of the share's ids three
--         times and POST /appointments (a server-made id) once. The ids are open appointments
--         started in SQL.
--   fast  no end: of every 20 requests one POST /appointments; of the others, one in three
--         GET /appointments/{id} (the share's ids, in turn) and two GET /health. About twice
--         the ends mix's rate on 2 cores (about 2,000 requests/s against 900), so bench.py runs
--         it once the backlog's ends are all sent. Every request goes through waitress, Falcon
--         and the telemetry middleware (request id, metrics); about a third reads the database
--         and one in 20 writes it, with access control and a request log line. /health does
--         neither: it is an open route, and its log line is DEBUG, below the default INFO.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "bench_lib.lua")

local end_body = '{"end_date": "2020-12-01 15:00:00"}'
local start_body = '{"physician_id": "ea959b03-5577-45c9-b9f7-a45d3e77ce82", "patient_id": "86158d46-ce33-4e3d-9822-462bbff5782e"}'
local ids, headers, fast = {}, nil, false
sent, ends, quota = 0, 0, 0 -- globals: done() reads them through thread:get

function init(args)
    local threads = tonumber(args[2])
    local total = tonumber(args[3])
    ids = bench.share(args[1], threads)
    out = args[4]
    fast = args[5] == "fast"
    quota = math.floor(total / threads) + ((index < total % threads) and 1 or 0)
    headers = bench.headers({ ["Content-Type"] = "application/json" })
end

function request()
    if bench.verifying() then
        return wrk.format("GET", "/health", headers)
    end
    sent = sent + 1
    if sent > quota then
        bench.finish()
        return wrk.format("GET", "/health", headers) -- wrk wants a request; this one may never go
    end
    if fast then
        if sent % 20 == 0 then
            return wrk.format("POST", "/appointments", headers, start_body)
        elseif sent % 3 == 0 then
            return wrk.format("GET", "/appointments/" .. ids[sent % #ids + 1], headers)
        end
        return wrk.format("GET", "/health", headers)
    end
    if ends < #ids and math.floor(sent * #ids / quota) > ends then
        ends = ends + 1
        return wrk.format("POST", "/appointments/" .. ids[ends] .. "/end", headers, end_body)
    end
    if sent % 4 == 0 then
        return wrk.format("POST", "/appointments", headers, start_body)
    end
    return wrk.format("GET", "/appointments/" .. ids[sent % #ids + 1], headers)
end

function extra_report()
    local sent_total, ends_total = 0, 0
    for _, thread in ipairs(bench.threads) do
        sent_total = sent_total + math.min(thread:get("sent"), thread:get("quota"))
        ends_total = ends_total + thread:get("ends")
    end
    return { sent = sent_total, ends = ends_total }
end

dofile(bench.dir .. "bench_report.lua")
